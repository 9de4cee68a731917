"""Warm pools through a real daemon (runtime/pools.py): a matching Create takes a sandbox
the pool spawned before, everything else is cold, a pooled sandbox serves one tenant once,
fills keep their rate bound, and nothing of a pool outlives its daemon (stop or SIGKILL).
The probe suite gives a pooled sandbox the same verdicts as a cold one."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.runtime.config import DaemonConfig
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.probes import suite

from .daemon_harness import (
    alive,
    collect_exec,
    reap,
    sandbox_footprint,
    set_child_subreaper,
    wait_until,
)
from .test_metrics import metrics_port, scrape, value

MiB = 1 << 20
#: The pool's class as a Create asks for it (the probe suite's limits that Create carries).
POOL_SPEC = {"memory_bytes": 128 * MiB, "pids_max": 64, "tmp_bytes": 8 * MiB, "cpus": 1.0}
POOL_TOML = """
pool_refill_per_s = {rate}
workspace_size = "16M"
[tenants.alpha]
host_dirs = ["{host_dir}"]
[tenants.beta]
[tenants.gamma]
host_dirs = ["{host_dir}"]
[pools.small]
size = {size}
memory = "128M"
pids = 64
tmp = "8M"
cpus = 1
tenants = ["alpha", "beta"]
"""


def pool_daemon(make_daemon, tmp_path, name="d", *, rate=20, size=2):
    host_dir = tmp_path / f"{name}-host"
    host_dir.mkdir(mode=0o755)
    return make_daemon(name, config=POOL_TOML.format(rate=rate, size=size,
                                                     host_dir=host_dir)).start(), host_dir


def fills(daemon) -> list:
    return daemon.records("sandbox.pool.fill")


def wait_fills(daemon, n: int) -> list[str]:
    """Ids of the first n sandboxes the pools spawned, once there are n."""
    assert wait_until(lambda: len(fills(daemon)) >= n, timeout_s=60, interval_s=0.05), (
        f"fewer than {n} pool fills:\n{daemon.log()}")
    return [r.sandbox_id for r in fills(daemon)][:n]


def created_record(daemon, sandbox_id: str):
    (rec,) = [r for r in daemon.records("sandbox.create") if r.sandbox_id == sandbox_id]
    return rec, json.loads(rec.detail_json)


def run(client, sandbox_id: str, script: str):
    return collect_exec(client.exec(sandbox_id, ["sh", "-c", script]))


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("pools", "field", "reason"), [
    ({"p": {"size": 0}}, "pools.p.size", "0 must be a whole number from 1 to 1024"),
    ({"p": {"size": 1, "colour": "red"}}, "pools.p.colour", "unknown setting"),
    ({"p": {"size": 1, "memory": "12Q"}}, "pools.p.memory", ""),
    ({"p": {"size": 1, "backend": "docker"}}, "pools.p.backend", "native sandboxes only"),
    ({"p": {"size": 1, "ttl": "2h"}}, "pools.p.ttl", "over the daemon's sandbox_ttl"),
    ({"p": {"size": 1, "tenants": ["Bad!"]}}, "pools.p.tenants", "is not a tenant name"),
    ({"p": {"size": 600}}, "pools", "leaves no room under max_sandboxes (512)"),
])
def test_a_bad_pool_table_is_refused_naming_its_key(pools, field, reason):
    with pytest.raises(InvalidSpec) as err:
        DaemonConfig(pools=pools).validate()
    assert err.value.field == field
    assert reason in str(err.value)


def test_a_refill_rate_of_zero_is_refused():
    with pytest.raises(InvalidSpec, match=r"^pool_refill_per_s: 0 must be a number"):
        DaemonConfig(pool_refill_per_s=0).validate()


# -- hits and misses ----------------------------------------------------------------------


def test_a_matching_create_takes_a_pooled_sandbox_with_the_requests_env(make_daemon,
                                                                       tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path)
    ready = wait_fills(daemon, 2)
    alpha = daemon.client("alpha")
    sb = alpha.create_sandbox(**POOL_SPEC, env={"GREETING": "hello from alpha"},
                              labels={"app": "t"})
    assert sb.id == ready[0]
    rec, detail = created_record(daemon, sb.id)
    assert (rec.tenant, detail["pool"], detail["memory_bytes"]) == ("alpha", "small", 128 * MiB)
    out = run(alpha, sb.id, 'echo "$GREETING"')
    assert (out.returncode, out.stdout) == (0, b"hello from alpha\n")
    assert [s.id for s in alpha.list_sandboxes("app=t")] == [sb.id]
    # the pool refills what was taken: a third sandbox of its own
    third = wait_fills(daemon, 3)[2]
    assert third not in (sb.id, ready[1])
    alpha.destroy_sandbox(sb.id)
    assert sandbox_footprint(sb.id) == {}
    # never handed out twice: every later hit is another sandbox the pool spawned
    later = [alpha.create_sandbox(**POOL_SPEC).id for _ in range(2)]
    assert later == [ready[1], third]
    ids = [r.sandbox_id for r in daemon.records("sandbox.create")]
    assert sorted(ids) == sorted({*ids}) and sb.id in ids
    daemon.stop()
    assert daemon.leftovers() == {}


def test_a_pooled_sandbox_killed_while_it_waits_is_never_handed_out(make_daemon, tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path)
    ready = wait_fills(daemon, 2)
    first_pid = json.loads(fills(daemon)[0].detail_json)["init_pid"]
    os.kill(first_pid, signal.SIGKILL)  # from outside, as an operator or the OOM killer might
    assert wait_until(lambda: not alive(first_pid) or _zombie(first_pid), timeout_s=10)
    alpha = daemon.client("alpha")
    sb = alpha.create_sandbox(**POOL_SPEC)
    assert sb.id == ready[1]  # the dead one was skipped
    out = run(alpha, sb.id, "echo alive")
    assert (out.returncode, out.stdout) == (0, b"alive\n")
    assert wait_until(lambda: any(
        r.sandbox_id == ready[0] and json.loads(r.detail_json)["reason"] == "pool-dead"
        for r in daemon.records("sandbox.destroy")), timeout_s=20)
    assert sandbox_footprint(ready[0]) == {}
    daemon.stop()
    assert daemon.leftovers() == {}


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_requests_that_do_not_match_the_class_are_created_cold(make_daemon, tmp_path):
    daemon, host_dir = pool_daemon(make_daemon, tmp_path)
    ready = set(wait_fills(daemon, 2))
    alpha, gamma = daemon.client("alpha"), daemon.client("gamma")
    cold = {
        "other memory": alpha.create_sandbox(**{**POOL_SPEC, "memory_bytes": 256 * MiB}),
        "allow_net": alpha.create_sandbox(**POOL_SPEC, allow_net=["example.com:443"]),
        "tenant not served": gamma.create_sandbox(**POOL_SPEC),
        "copy-on-write workspace": alpha.create_sandbox(
            **POOL_SPEC, workspace_dir=str(host_dir), workspace_cow=True),
    }
    for why, sb in cold.items():
        assert sb.id not in ready, why
        assert "pool" not in created_record(daemon, sb.id)[1], why
    assert len(fills(daemon)) == 2  # none of them took a ready sandbox
    daemon.stop()
    assert daemon.leftovers() == {}


def test_a_pooled_sandbox_shows_the_requests_host_workspace_as_a_cold_one_does(
        make_daemon, tmp_path):
    daemon, host_dir = pool_daemon(make_daemon, tmp_path, size=1)
    (ready,) = wait_fills(daemon, 1)
    os.chown(host_dir, 4321, 4321)
    (host_dir / "from-host").write_text("host\n")
    alpha, gamma = daemon.client("alpha"), daemon.client("gamma")
    pooled = alpha.create_sandbox(**POOL_SPEC, workspace_dir=str(host_dir))
    cold = gamma.create_sandbox(**POOL_SPEC, workspace_dir=str(host_dir))
    assert (pooled.id, "pool" in created_record(daemon, cold.id)[1]) == (ready, False)
    assert created_record(daemon, pooled.id)[1]["pool"] == "small"
    for name, client, sb in (("pooled", alpha, pooled), ("cold", gamma, cold)):
        out = run(client, sb.id, f"cat /workspace/from-host && echo {name} > /workspace/{name}"
                                 f" && stat -c '%u %g' /workspace /workspace/{name}")
        assert (out.returncode, out.stdout) == (0, b"host\n0 0\n0 0\n"), name
        assert "workspace" not in sandbox_footprint(sb.id), name  # none of its own left
        client.write_file(sb.id, f"api-{name}", b"through the file API")
        assert client.read_file(sb.id, name) == f"{name}\n".encode()
        for written in (name, f"api-{name}"):  # the directory's owner's, as with no sandbox
            st = os.stat(host_dir / written)
            assert (st.st_uid, st.st_gid) == (4321, 4321), written
    daemon.stop()
    assert daemon.leftovers() == {}
    assert sorted(os.listdir(host_dir)) == ["api-cold", "api-pooled", "cold", "from-host",
                                            "pooled"]


def test_two_tenants_never_share_a_pooled_sandbox(make_daemon, tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path)
    ready = wait_fills(daemon, 2)
    alpha, beta = daemon.client("alpha"), daemon.client("beta")
    a = alpha.create_sandbox(**POOL_SPEC)
    b = beta.create_sandbox(**POOL_SPEC)
    assert sorted([a.id, b.id]) == sorted(ready)
    assert [s.id for s in alpha.list_sandboxes()] == [a.id]
    assert [s.id for s in beta.list_sandboxes()] == [b.id]
    with pytest.raises(ClientError) as err:
        beta.get_sandbox(a.id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    # a ready sandbox nobody acquired is nobody's: not listed, not reachable by id
    spare = wait_fills(daemon, 3)[2]
    for c in (alpha, beta, daemon.client()):
        assert spare not in [s.id for s in c.list_sandboxes()]
        with pytest.raises(ClientError) as err:
            c.get_sandbox(spare)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    daemon.stop()
    assert daemon.leftovers() == {}


def test_fills_keep_the_refill_rate_bound(make_daemon, tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path, rate=2, size=3)
    wait_fills(daemon, 3)
    alpha = daemon.client("alpha")
    for _ in range(3):
        alpha.create_sandbox(**POOL_SPEC)
    wait_fills(daemon, 6)
    daemon.stop()
    times = [r.time for r in fills(daemon)]
    assert len(times) == 6  # the pool's size, then one per sandbox taken: no more
    # each fill starts at least 1/rate after the one before it ended (recorded times)
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.5


# -- nothing outlives the daemon ----------------------------------------------------------


def test_pool_gauges_move_when_a_pooled_sandbox_is_taken(make_daemon, tmp_path):
    host_dir = tmp_path / "m-host"
    host_dir.mkdir()
    daemon = make_daemon("m", args=("--metrics", "127.0.0.1:0"), config=POOL_TOML.format(
        rate=1, size=2, host_dir=host_dir)).start()
    wait_fills(daemon, 2)
    port = metrics_port(daemon)
    before = scrape(port)
    assert value(before, "corral_pool_sandboxes", pool="small", state="ready") == 2
    assert value(before, "corral_pool_sandboxes", pool="small", state="size") == 2
    assert value(before, "corral_sandboxes", state="pooled", tenant="", backend="native") == 2
    daemon.client("alpha").create_sandbox(**POOL_SPEC)
    after = scrape(port)  # the refill waits a second (rate 1): one is missing now
    assert value(after, "corral_pool_sandboxes", pool="small", state="ready") == 1
    assert value(after, "corral_sandboxes", state="running", tenant="alpha",
                 backend="native") == 1
    daemon.stop()


def test_daemon_stop_drains_the_pools(make_daemon, tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path)
    ready = wait_fills(daemon, 2)
    assert all(sandbox_footprint(i) for i in ready)  # they are real sandboxes
    assert daemon.stop() == 0
    drained = [r.sandbox_id for r in daemon.records("sandbox.destroy")
               if json.loads(r.detail_json)["reason"] == "pool-drain"]
    assert sorted(drained) == sorted(ready)
    assert {i: sandbox_footprint(i) for i in ready} == {i: {} for i in ready}
    pids = [json.loads(r.detail_json)["init_pid"] for r in fills(daemon)]
    assert [p for p in pids if os.path.exists(f"/proc/{p}")
            and open(f"/proc/{p}/comm").read().strip() == "corral-init"] == []


def test_a_killed_daemons_pools_are_swept_at_restart(make_daemon, tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path)
    ready = wait_fills(daemon, 2)
    taken = daemon.client("alpha").create_sandbox(**POOL_SPEC).id
    wait_fills(daemon, 3)
    every = [r.sandbox_id for r in fills(daemon)]
    pids = [json.loads(r.detail_json)["init_pid"] for r in fills(daemon)]
    assert taken in ready and all(alive(p) for p in pids)
    set_child_subreaper(True)  # the orphaned PID 1s are reaped by us, not left as zombies
    try:
        assert daemon.kill() == -9
        assert wait_until(lambda: not any(alive(p) for p in pids)), "PR_SET_PDEATHSIG"
        reap(pids)
    finally:
        set_child_subreaper(False)
    daemon.start()
    # The restart's sweep removes what they left and records sandbox.reaped; any process
    # that starts sandboxes on this host in between (a colleague's daemon) sweeps dead
    # creators' sandboxes too and may take some first: what must hold is that none is left.
    assert {i: sandbox_footprint(i) for i in every} == {i: {} for i in every}
    reaped = [r for r in daemon.records("sandbox.reaped") if r.sandbox_id in every]
    assert {json.loads(r.detail_json)["reason"] for r in reaped} <= {"its daemon died"}
    daemon.stop()
    assert daemon.leftovers() == {}


# -- the same isolation ---------------------------------------------------------------------


class _Ran:
    """A finished daemon Exec as the probe runner reads a process."""

    def __init__(self, result):
        self.returncode, self.reason, self._result = result.returncode, result.reason, result

    def communicate(self):
        return self._result.stdout, self._result.stderr


def same_verdicts(daemon, pooled: str, cold: str) -> dict[str, dict]:
    """The probe suite's shared-sandbox probes (the others make sandboxes of their own) run
    in a pooled sandbox of tenant alpha and a cold one of tenant gamma; asserts both get the
    same verdicts and outcomes, and returns them by tenant."""
    probes = [p for p in suite.PROBES if p.own is None and p.procedure is None]
    verdicts = {}
    for tenant, sandbox_id in (("alpha", pooled), ("gamma", cold)):
        ctx = suite.Context("native", "default", None)
        ctx.shared = _DaemonSandbox(daemon.client(tenant), sandbox_id)
        verdicts[tenant] = {p.name: suite.run_probe(ctx, p) for p in probes}
    assert len(probes) >= 30
    assert {n: (r.verdict, r.outcome) for n, r in verdicts["alpha"].items()} == {
        n: (r.verdict, r.outcome) for n, r in verdicts["gamma"].items()}
    return verdicts


class _DaemonSandbox:
    """A sandbox of the daemon, exec'd through its client (what run_inside needs)."""

    def __init__(self, client, sandbox_id: str):
        self.client, self.id = client, sandbox_id

    def exec(self, argv, **_kw):
        return _Ran(collect_exec(self.client.exec(self.id, list(argv))))


@pytest.mark.timeout(900)
def test_the_probe_suite_gives_a_pooled_sandbox_the_verdicts_of_a_cold_one(make_daemon,
                                                                          tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path, size=1)
    (ready,) = wait_fills(daemon, 1)
    pooled = daemon.client("alpha").create_sandbox(**POOL_SPEC).id
    cold = daemon.client("gamma").create_sandbox(**POOL_SPEC).id  # gamma: not served
    assert (pooled, "pool" in created_record(daemon, cold)[1]) == (ready, False)
    verdicts = same_verdicts(daemon, pooled, cold)
    escaped = {n: r.evidence for n, r in verdicts["alpha"].items()
               if r.verdict != suite.CONTAINED}
    # these two judge against the suite's nofile (256) and fsize (16 MiB), which a Create
    # cannot ask for: both sandboxes stop exactly at the daemon's limits instead
    assert escaped == {
        "disk-fill-workspace": 'ENOSPC: {"errno": "ENOSPC", "written": 16777216}',
        "fd-exhaustion": 'EMFILE: {"errno": "EMFILE", "highest": 1024}'}
    daemon.stop()
    assert daemon.leftovers() == {}


def test_a_pooled_sandbox_reports_the_same_kernel_policy_as_a_cold_one(make_daemon,
                                                                      tmp_path):
    daemon, _ = pool_daemon(make_daemon, tmp_path, size=1)
    wait_fills(daemon, 1)
    alpha, gamma = daemon.client("alpha"), daemon.client("gamma")
    pooled = alpha.create_sandbox(**POOL_SPEC, env={"X": "1"})
    cold = gamma.create_sandbox(**POOL_SPEC, env={"X": "1"})
    reports = [c.inspect_sandbox(s.id) for c, s in ((alpha, pooled), (gamma, cold))]
    assert [list(r.mismatches) for r in reports] == [[], []]
    # read from the kernel: limits, landlock, links and routes, what the sandbox lacks
    pooled_live, cold_live = (json.loads(r.report_json) for r in reports)
    for key in ("cgroup_limits", "landlock", "network", "notes"):
        assert pooled_live[key] == cold_live[key], key
    assert pooled_live["cgroup_limits"]
    daemon.stop()
    assert daemon.leftovers() == {}
