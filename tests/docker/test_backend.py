"""The docker backend on a real (private) Docker engine: the spec as the engine stores it,
the exec path, exit codes, limits, cleanup, the sweep and a missing engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from corral.sandbox import CommandNotFound, ExitReason, InvalidSpec, SandboxSpec, ids
from corral.sandbox.backends import docker, open_sandbox, run
from corral.sandbox.backends.docker import LABEL, DockerSandbox
from corral.sandbox.backends.docker import image as docker_image
from corral.sandbox.backends.docker.private_engine import PrivateEngine
from corral.sandbox.errors import Unavailable

from ..processes import alive, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spec(**fields) -> SandboxSpec:
    fields.setdefault("backend", "docker")
    return SandboxSpec(**fields)


# == the spec as the engine stores it ========================================================


def test_host_config_carries_the_whole_policy(docker_host):
    spec = _spec(memory_bytes=96 * MiB, pids_max=40, cpus=0.5, tmp_bytes=16 * MiB, nofile=300,
                 fsize_bytes=8 * MiB)
    with DockerSandbox.create(spec) as sb:
        info = sb.api.inspect_container(sb.container_id)
    hc, cfg = info["HostConfig"], info["Config"]
    assert hc["ReadonlyRootfs"] is True
    assert hc["CapDrop"] == ["ALL"]
    assert hc["CapAdd"] is None
    assert hc["Privileged"] is False
    assert hc["NetworkMode"] == "none"
    assert hc["PidsLimit"] == 40
    assert (hc["Memory"], hc["MemorySwap"]) == (96 * MiB, 96 * MiB)
    assert hc["NanoCpus"] == 500_000_000
    assert hc["Tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={16 * MiB},mode=1777"}
    assert hc["ShmSize"] == 16 * MiB
    assert hc["Init"] is True
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in hc["Ulimits"]} == {
        "nofile": (300, 300), "fsize": (8 * MiB, 8 * MiB), "core": (0, 0)}
    assert "no-new-privileges:true" in hc["SecurityOpt"]
    (seccomp_opt,) = [o for o in hc["SecurityOpt"] if o.startswith("seccomp=")]
    with open(os.path.join(REPO_ROOT, "sandbox", "profiles", "default.json")) as f:
        assert json.loads(seccomp_opt[len("seccomp="):]) == json.load(f)
    assert sorted((m["Destination"], m["RW"]) for m in info["Mounts"]) == [
        ("/run/corral-fds", False), ("/workspace", True)]
    assert cfg["User"] == f"{sb.spec.uid_base}:{sb.spec.uid_base}"  # its own range's root
    assert cfg["Labels"][LABEL] == sb.id
    assert cfg["Hostname"] == "corral"


def test_unconfined_profile_turns_the_filter_off(docker_host):
    with DockerSandbox.create(_spec(profile="unconfined")) as sb:
        out, _ = sb.exec(["grep", "^Seccomp:", "/proc/self/status"]).communicate()
    assert out.split() == [b"Seccomp:", b"0"]


def test_a_bad_profile_is_refused_before_the_engine_is_asked(docker_host, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaultAction": "SCMP_ACT_NOPE"}')
    with pytest.raises(InvalidSpec, match=r"^profile: "):
        DockerSandbox.create(_spec(profile=str(bad)))


# == the base image ===========================================================================


def test_base_image_is_built_once_per_engine(docker_host):
    first = docker.base_image(docker_host)
    docker_image._images.pop(docker_host)  # forget the process-wide cache: ask the engine again
    second = docker.base_image(docker_host)
    api = docker.client(docker_host)
    tags = [t for image in api.images(name=docker.IMAGE_REPOSITORY) for t in image["RepoTags"]]
    assert first == second
    assert tags == [first]


def test_base_image_runs_python_and_the_agent_helper(docker_host):
    result = run(["python3", "-I", "-c",
                         "import sys; sys.path.insert(0, '/opt/corral/lib'); "
                         "import corral_agent, ssl, json, ctypes; print('ok')"],
                        _spec(), docker_host=docker_host)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ok\n", b"")


# == commands ==================================================================================


def test_streamed_output_exit_code_and_stdin(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["sh", "-c", "cat; echo to-err >&2; exit 7"])
        out, err = proc.communicate(b"from stdin\n" * 10000)
    assert out == b"from stdin\n" * 10000
    assert err == b"to-err\n"
    assert (proc.returncode, proc.reason) == (7, ExitReason.EXITED)


def test_output_is_delivered_as_it_comes(docker_host):
    seen: list[tuple[float, bytes]] = []
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["sh", "-c", "echo first; sleep 1; echo second"])
        proc.pump(lambda b: seen.append((time.monotonic(), b)), lambda b: None)
    chunks = b"".join(b for _, b in seen)
    assert chunks == b"first\nsecond\n"
    assert seen[0][1] == b"first\n"  # arrived alone, before the sleep ended


def test_signal_exit_is_reported_as_negative(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["sh", "-c", "kill -TERM $$"])
        proc.communicate()
    assert (proc.returncode, proc.reason) == (-signal.SIGTERM, ExitReason.SIGNALED)


def test_timeout_kills_the_command(docker_host):
    with DockerSandbox.create(_spec(timeout_s=1.0)) as sb:
        start = time.monotonic()
        proc = sb.exec(["sleep", "60"])
        proc.communicate()
        took = time.monotonic() - start
        after = sb.exec(["true"])
        after.communicate()
    assert (proc.returncode, proc.reason) == (-signal.SIGKILL, ExitReason.TIMEOUT)
    assert took >= 1.0  # not before the limit
    assert after.returncode == 0  # the sandbox itself lives on


def test_memory_limit_kill_is_reported_as_oom(docker_host):
    with DockerSandbox.create(_spec(memory_bytes=48 * MiB)) as sb:
        proc = sb.exec(["python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"])
        proc.communicate()
        oom_kills = sb.stats()["oom_kills"]
    assert (proc.returncode, proc.reason) == (-signal.SIGKILL, ExitReason.OOM)
    assert oom_kills >= 1


@pytest.mark.parametrize("argv,errno_name", [
    (["no-such-program"], "ENOENT"),
    (["/etc/passwd"], "EACCES"),
])
def test_command_not_found(docker_host, argv, errno_name):
    import errno as errno_mod

    with DockerSandbox.create(_spec()) as sb:
        with pytest.raises(CommandNotFound) as info:
            sb.exec(argv)
        still = sb.exec(["true"])
        still.communicate()
    assert info.value.errno == getattr(errno_mod, errno_name)
    assert still.returncode == 0


def test_a_quick_exit_127_of_a_real_program_is_not_command_not_found(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["sh", "-c", "echo here; exit 127"])
        out, _ = proc.communicate()
    assert (proc.returncode, out) == (127, b"here\n")


def test_workspace_is_shared_across_commands_and_owned_by_the_sandbox_uid(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        sb.exec(["sh", "-c", "echo kept > /workspace/note"]).communicate()
        out, _ = sb.exec(["cat", "note"]).communicate()
        st = os.stat(os.path.join(sb.workspace, "note"))
    assert out == b"kept\n"
    assert (st.st_uid, st.st_gid) == (sb.spec.uid_base, sb.spec.uid_base)


def test_user_workspace_and_binds(docker_host, tmp_path):
    work = tmp_path / "work"
    data = tmp_path / "data"
    work.mkdir()
    data.mkdir()
    (data / "input.txt").write_text("hello\n")
    os.chmod(work, 0o777)
    spec = SandboxSpec.build(workspace=str(work), ro=[f"{data}:/data"], backend="docker")
    with DockerSandbox.create(spec) as sb:
        proc = sb.exec(["sh", "-c", "cat /data/input.txt > /workspace/copy; "
                                    "touch /data/x 2>&1 || true"])
        out, _ = proc.communicate()
    assert (work / "copy").read_text() == "hello\n"
    assert b"Read-only file system" in out
    assert os.path.isdir(work)  # a caller's workspace is never removed


# == cleanup ===================================================================================


def test_destroy_kills_double_forked_processes(docker_host):
    sb = DockerSandbox.create(_spec())
    try:
        sb.exec(["sh", "-c", "(setsid sleep 1000 &)"]).communicate()
        assert wait_until(lambda: len(sb.pids()) == 3)  # docker-init, sleep infinity, sleep 1000
        pids = sb.pids()
        workspace = sb.workspace
    finally:
        sb.destroy()
    assert wait_until(lambda: not any(alive(p) for p in pids))
    assert not os.path.exists(workspace)
    assert docker.client(docker_host).containers(all=True, filters={"label": LABEL}) == []
    sb.destroy()  # idempotent


def test_sweep_removes_containers_of_a_dead_creator(docker_host):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO_ROOT!r})
        from corral.sandbox import SandboxSpec
        from corral.sandbox.backends.docker import DockerSandbox
        sb = DockerSandbox.create(SandboxSpec(backend="docker"), docker_host={docker_host!r})
        print(sb.id, sb.workspace, sb._fds_dir, flush=True)
        os.kill(os.getpid(), 9)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    sandbox_id, workspace, fds_dir = result.stdout.decode().split()
    api = docker.client(docker_host)
    assert [c["Labels"][LABEL] for c in api.containers(all=True, filters={"label": LABEL})] \
        == [sandbox_id]
    assert docker.sweep(docker_host) == [sandbox_id]
    assert api.containers(all=True, filters={"label": LABEL}) == []
    assert not os.path.exists(workspace)
    assert not os.path.exists(fds_dir)


def test_sweep_leaves_live_sandboxes_alone(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        assert docker.sweep(docker_host) == []
        out, _ = sb.exec(["echo", "alive"]).communicate()
    assert out == b"alive\n"


# == no engine =================================================================================


def test_missing_engine_is_unavailable_with_a_message(tmp_path):
    url = f"unix://{tmp_path}/no-docker.sock"
    with pytest.raises(Unavailable, match=r"^no Docker engine answers at unix://.*no-docker\.sock "
                                          r"\(.*\); start dockerd, or point Corral at one with "
                                          r"DOCKER_HOST or --docker-host$"):
        open_sandbox(_spec(), docker_host=url)


def test_cli_reports_a_missing_engine_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "run", "--backend", "docker",
         "--docker-host", f"unix://{tmp_path}/no-docker.sock", "--", "true"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 125
    assert result.stderr.startswith("corral: run: no Docker engine answers at unix://")
    assert "Traceback" not in result.stderr


def test_cli_runs_on_the_docker_backend(docker_host):
    result = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "run", "--backend", "docker", "--memory",
         "64M", "--", "sh", "-c", "id -u; cat; exit 3"],
        input="piped\n", capture_output=True, text=True, timeout=120)
    uid, piped = result.stdout.splitlines()
    assert (result.returncode, piped) == (3, "piped"), result.stderr
    pool = ids.pool()  # the container's user is the root of a range of Corral's pool
    assert pool.start <= int(uid) < pool.end and (int(uid) - pool.start) % ids.RANGE == 0
    timed = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "run", "--backend", "docker", "--timeout",
         "1s", "--", "sleep", "30"], capture_output=True, text=True, timeout=120)
    assert timed.returncode == 124
    assert "killed after the 1s timeout" in timed.stderr
    oom = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "run", "--backend", "docker", "--memory",
         "32M", "--", "python3", "-c", "b = b'x' * (256 << 20)"],
        capture_output=True, text=True, timeout=120)
    assert oom.returncode == 137
    assert "killed by the 32M memory limit (OOM)" in oom.stderr


def test_spec_names_a_known_backend():
    assert SandboxSpec().backend == "native"
    assert SandboxSpec.build(backend="docker").backend == "docker"
    with pytest.raises(InvalidSpec, match=r"^backend: 'podman' is not a backend; use native or "
                                          r"docker$"):
        SandboxSpec(backend="podman")


def test_output_nobody_reads_does_not_stall_the_command(docker_host):
    """DEVNULL output is drained while waiting: 8 MiB never fills the connection."""
    from corral.sandbox import DEVNULL

    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["head", "-c", str(8 * MiB), "/dev/zero"], stdin=DEVNULL,
                       stdout=DEVNULL, stderr=DEVNULL)
        assert proc.wait(timeout=60) == 0


def test_output_kept_while_waiting_is_delivered_later(docker_host):
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["sh", "-c", "head -c 300000 /dev/zero; echo end >&2"])
        assert proc.wait(timeout=60) == 0
        out, err = proc.communicate()
    assert (len(out), err) == (300000, b"end\n")


def test_exec_into_descriptors_relays_both_ways(docker_host):
    """The daemon's way: descriptors for stdin/stdout/stderr, closed by the caller at once."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with DockerSandbox.create(_spec()) as sb:
        ended = []
        proc = sb.exec(["sh", "-c", "cat; echo done >&2"], stdin=in_r, stdout=out_w,
                       stderr=err_w)
        proc.on_exit = ended.append
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        os.write(in_w, b"relayed\n")
        os.close(in_w)
        with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
            got = (out.read(), err.read())
        assert wait_until(lambda: proc.returncode is not None)
        assert wait_until(lambda: sb.collect_exits() >= 0 and ended == [proc])
    assert got == (b"relayed\n", b"done\n")
    assert proc.returncode == 0


def test_cli_streams_a_large_stdin(docker_host):
    data = b"".join(b"%07d\n" % i for i in range(400_000))  # 3.2 MB
    result = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "run", "--backend", "docker", "--",
         "sha256sum"], input=data, capture_output=True, timeout=120)
    import hashlib

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_private_engine_leaves_the_host_network_alone(docker_engine, docker_host):
    """No bridge, no forwarding switched on: dockerd's defaults would set ip_forward=1."""
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == docker_engine.ip_forward_before
    assert not os.path.exists("/sys/class/net/docker0")


def test_containers_live_under_the_engines_own_cgroup_parent(docker_engine, docker_host):
    with DockerSandbox.create(_spec()) as sb:
        with open(f"/proc/{sb.init_pid}/cgroup") as f:
            paths = {line.rstrip().split(":", 2)[2] for line in f}
        container_id = sb.container_id
    assert paths == {f"/{docker_engine.name}/{container_id}"}


def test_private_engine_stop_removes_everything_it_made():
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root")
    import glob

    engine = PrivateEngine().start()
    pid = engine.proc.pid
    with DockerSandbox.create(_spec(), docker_host=engine.url) as sb:
        sb.exec(["sh", "-c", "sleep 1000 &"]).communicate()
        pids = sb.pids()
    left = DockerSandbox.create(_spec(), docker_host=engine.url)  # for stop() to remove
    engine.stop()
    assert not os.path.exists(left.workspace)
    assert not alive(pid)
    assert not any(alive(p) for p in pids)
    assert not os.path.exists(engine.dir)
    assert glob.glob(f"/sys/fs/cgroup/*/{engine.name}") == []
    with open("/proc/self/mountinfo") as f:
        assert [line for line in f if engine.dir in line] == []


def test_engine_of_a_killed_test_run_is_swept():
    """A run SIGKILLed before PrivateEngine.stop() leaves dockerd, containerd, shims and a
    running container; the next engine's start sweeps all of it."""
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root")
    import glob

    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO_ROOT!r})
        from corral.sandbox import SandboxSpec
        from corral.sandbox.backends.docker import DockerSandbox
        from corral.sandbox.backends.docker.private_engine import PrivateEngine
        engine = PrivateEngine().start()
        sb = DockerSandbox.create(SandboxSpec(backend="docker"), docker_host=engine.url)
        sb.exec(["sh", "-c", "sleep 1000 &"]).communicate()
        print(engine.dir, engine.name, sb.workspace, sb._fds_dir,
              " ".join(map(str, sb.pids())), flush=True)
        os.kill(os.getpid(), 9)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    engine_dir, name, workspace, fds_dir, *pids = result.stdout.decode().split()
    assert os.path.isdir(engine_dir) and all(alive(int(p)) for p in pids)
    assert os.path.isdir(workspace) and os.path.isdir(fds_dir)
    assert engine_dir in PrivateEngine.sweep()
    assert not os.path.exists(workspace) and not os.path.exists(fds_dir)
    assert not any(alive(int(p)) for p in pids)
    assert not os.path.exists(engine_dir)
    assert glob.glob(f"/sys/fs/cgroup/*/{name}") == []
    with open("/proc/self/mountinfo") as f:
        assert [line for line in f if engine_dir in line] == []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    assert name.encode() not in f.read()
            except OSError:
                pass


PROTOCOL_ECHO = """
import os
events, control = int(os.environ["EV"]), int(os.environ["CT"])
os.write(events, b"hello from inside\\n")
data = b""
while chunk := os.read(control, 4096):
    data += chunk
os.write(events, b"got " + data)
print("stdout too")
"""


def test_pass_fds_cross_the_engine_both_ways(docker_host):
    """The agent protocol's descriptors: a write end to read events from, a read end to
    send control bytes through, as the daemon passes them."""
    events_r, events_w = os.pipe()
    control_r, control_w = os.pipe()
    with DockerSandbox.create(_spec()) as sb:
        proc = sb.exec(["python3", "-c", PROTOCOL_ECHO], env={"EV": "3", "CT": "4"},
                       pass_fds={3: events_w, 4: control_r})
        os.close(events_w)
        os.close(control_r)
        os.write(control_w, b"control bytes")
        os.close(control_w)
        out, err = proc.communicate()
        with os.fdopen(events_r, "rb") as f:
            events = f.read()
        fifos_gone = wait_until(lambda: os.listdir(sb._fds_dir) == [])
    assert (proc.returncode, out, err) == (0, b"stdout too\n", b"")
    assert events == b"hello from inside\ngot control bytes"
    assert fifos_gone  # the relays remove their FIFOs once the command has ended


def test_pass_fds_keeps_command_not_found(docker_host):
    r, w = os.pipe()
    try:
        with DockerSandbox.create(_spec()) as sb:
            with pytest.raises(CommandNotFound):
                sb.exec(["no-such-agent"], pass_fds={3: w})
    finally:
        os.close(r)
        os.close(w)
