"""`corral run`, `corral probe` and `corral doctor` as an ordinary user, no setuid helper of
Corral's: root inside is the user, ids 1..65535 their subordinate range (newuidmap) or
nothing (a single-id map); every unprivileged mechanism stays on; with no delegated cgroup
(v1 here) one line says so and rlimits stand in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from corral.sandbox import cgroup_tuning, cgroups, net

from ..processes import wait_until
from .conftest import as_user_do, run_as, subid_range

NO_CGROUP_LINE = f"corral: {cgroups.NO_DELEGATION}\n"

#: Inside: identity, maps and the process's own containment, as /proc tells it.
SELF_REPORT = (
    "id; cat /proc/self/uid_map /proc/self/gid_map; "
    "grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd):' /proc/self/status; "
    "touch /x 2>&1 | grep -o 'Read-only file system'; "
    "python3 -c 'import errno\ntry:\n open(\"/proc/sys/kernel/hostname\", \"w\")\n"
    "except OSError as e: print(errno.errorcode[e.errno])'"
)


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_run_id_as_a_user_with_subordinate_ids(rootless_user, user_python):
    sub_uid = subid_range(rootless_user, "/etc/subuid")
    sub_gid = subid_range(rootless_user, "/etc/subgid")
    assert sub_uid and sub_gid  # useradd gave them one
    r = run_as(rootless_user, user_python, "run", "--", "sh", "-c", SELF_REPORT)
    assert (r.returncode, r.stderr) == (0, NO_CGROUP_LINE)
    lines = r.stdout.splitlines()
    assert lines[0] == "uid=0(root) gid=0(root) groups=0(root)"
    assert rows("\n".join(lines[1:5])) == [
        ["0", str(rootless_user.uid), "1"], ["1", str(sub_uid[0]), "65535"],
        ["0", str(rootless_user.gid), "1"], ["1", str(sub_gid[0]), "65535"]]
    assert lines[5:] == ["CapEff:\t0000000000000000", "CapBnd:\t0000000000000000",
                         "NoNewPrivs:\t1", "Seccomp:\t2", "Read-only file system", "EROFS"]


def test_run_with_a_single_id_map_when_the_user_has_no_subordinate_ids(single_id_user,
                                                                      user_python):
    assert subid_range(single_id_user, "/etc/subuid") is None
    r = run_as(single_id_user, user_python, "run", "--", "sh", "-c", SELF_REPORT)
    assert (r.returncode, r.stderr) == (0, NO_CGROUP_LINE)
    lines = r.stdout.splitlines()
    assert lines[0] == "uid=0(root) gid=0(root) groups=0(root)"
    assert rows("\n".join(lines[1:3])) == [["0", str(single_id_user.uid), "1"],
                                           ["0", str(single_id_user.gid), "1"]]
    assert lines[3:] == ["CapEff:\t0000000000000000", "CapBnd:\t0000000000000000",
                         "NoNewPrivs:\t1", "Seccomp:\t2", "Read-only file system", "EROFS"]


def test_readme_workspace_example_as_a_user_writes_the_users_file(rootless_user, user_python):
    proj = rootless_user.home / "proj"
    as_user_do(rootless_user, user_python,
               "import os; os.mkdir('proj'); "
               "open('proj/Makefile', 'w').write('all:; echo built > out.txt\\n')")
    r = run_as(rootless_user, user_python, "run", "--workspace", "./proj", "--", "make", "-C",
               "/workspace")
    assert r.returncode == 0, r.stderr
    assert r.stderr == NO_CGROUP_LINE
    assert (proj / "out.txt").read_text() == "built\n"
    st = os.stat(proj / "out.txt")
    assert (st.st_uid, st.st_gid) == (rootless_user.uid, rootless_user.gid)


def test_a_mktemp_workspace_0700_as_a_user(rootless_user, user_python):
    made = as_user_do(rootless_user, user_python,
                      "import tempfile; print(tempfile.mkdtemp(dir='.'))").strip()
    r = run_as(rootless_user, user_python, "run", "--workspace", made, "--", "sh", "-c",
               "echo x > f && stat -c '%u %a' /workspace f")
    assert (r.returncode, r.stdout) == (0, "0 700\n0 644\n"), r.stderr
    assert os.stat(os.path.join(rootless_user.home, made, "f")).st_uid == rootless_user.uid


def test_limits_stand_in_as_rlimits_without_a_cgroup(rootless_user, user_python):
    code = ("import resource as r; print(r.getrlimit(r.RLIMIT_DATA)[0] >> 20, "
            "r.getrlimit(r.RLIMIT_NPROC)[0]); open('/proc/self/cgroup').read()")
    r = run_as(rootless_user, user_python, "run", "--memory", "96M", "--pids", "40", "--",
               "python3", "-c", code)
    assert (r.returncode, r.stdout, r.stderr) == (0, "96 40\n", NO_CGROUP_LINE)


def test_a_directory_planted_where_the_users_tree_goes_is_refused(rootless_user, user_python):
    planted = f"/tmp/corral-{rootless_user.uid}"
    os.rename(planted, planted + ".mine") if os.path.exists(planted) else None
    os.mkdir(planted, 0o777)  # root's, world-writable: not the user's
    try:
        r = run_as(rootless_user, user_python, "run", "--", "true")
        assert r.returncode == 125
        assert r.stderr == (
            f"corral: run: sandbox setup failed at runtime directory '{planted}': EPERM "
            f"Operation not permitted (it is not a directory owned by uid {rootless_user.uid}"
            f"; remove it or set XDG_RUNTIME_DIR)\n")
    finally:
        os.rmdir(planted)
        if os.path.exists(planted + ".mine"):
            os.rename(planted + ".mine", planted)


def test_doctor_as_a_user(rootless_user, user_python):
    r = run_as(rootless_user, user_python, "doctor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["uid"], report["rootless"]) == (rootless_user.uid, True)
    status = {c["feature"]: c["status"] for c in report["checks"]}
    with open("/proc/self/mountinfo") as f:  # a host setting: as root made it
        moves = "ok" if cgroup_tuning.is_on(f.read()) else "degraded"
    assert status == {"user namespaces": "ok", "subordinate ids": "ok",
                      "idmapped mounts": "ok", "cgroups": "degraded", "cgroup moves": moves,
                      "landlock": "ok", "seccomp": "ok", "overlayfs": "ok",
                      "egress": "degraded"}
    cg = next(c for c in report["checks"] if c["feature"] == "cgroups")
    assert "not writable by uid" in cg["found"]
    assert cgroups.NO_DELEGATION in cg["without"]


def test_the_whole_probe_suite_as_a_user_contains_everything(rootless_user, user_python):
    r = run_as(rootless_user, user_python, "probe", "--json", timeout=600)
    report = json.loads(r.stdout)
    escaped = [p["name"] for p in report["probes"] if p["verdict"] != "contained"]
    assert (r.returncode, escaped) == (0, []), r.stderr
    assert report["summary"]["contained"] == len(report["probes"]) >= 90
    assert r.stderr == NO_CGROUP_LINE


@contextlib.contextmanager
def users_daemon(user, python: str, name: str, env: dict | None = None):
    """`corral daemon` run by user, serving on ~/NAME.sock with state in ~/NAME-state;
    yields the socket once it answers, and checks it stops cleanly on SIGTERM."""
    sock = str(user.home / f"{name}.sock")
    daemon = subprocess.Popen(
        [python, "-m", "corral.runtime.cli", "daemon", "--socket", sock, "--state",
         str(user.home / f"{name}-state")],
        user=user.uid, group=user.gid, extra_groups=[],
        env={"HOME": str(user.home), "PATH": "/usr/bin:/bin", **(env or {})},
        cwd=str(user.home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: daemon.poll() is not None or run_as(
            user, python, "ps", "--socket", sock).returncode == 0,
            timeout_s=60) and daemon.poll() is None
        yield sock
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, out


def test_the_daemon_as_a_user(rootless_user, user_python):
    """`corral daemon`, create, exec and inspect, all as the user: inspect shows the note
    and the sandbox's real two-line map, and finds nothing to flag."""
    with users_daemon(rootless_user, user_python, "corral") as sock:
        created = run_as(rootless_user, user_python, "create", "--socket", sock)
        assert created.returncode == 0, created.stderr
        sb = created.stdout.strip()
        r = run_as(rootless_user, user_python, "exec", "--socket", sock, sb, "--", "sh", "-c",
                   "id -u; echo x > f; stat -c %u f")
        assert (r.returncode, r.stdout) == (0, "0\n0\n"), r.stderr
        r = run_as(rootless_user, user_python, "inspect", "--socket", sock, sb)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"note: {cgroups.NO_DELEGATION}\n" in r.stdout
        assert "cgroup: none of its own (its processes are in the caller's)\n" in r.stdout
        sub = subid_range(rootless_user, "/etc/subuid")
        assert f"uid_map: 0 {rootless_user.uid} 1 1 {sub[0]} 65535" in r.stdout
        assert r.stdout.endswith("matches the spec\n")
        assert run_as(rootless_user, user_python, "destroy", "--socket", sock,
                      sb).returncode == 0


#: Inside: through the proxy (HTTP, CONNECT to HTTPS, a denied name), the resolver, and a
#: client that ignores HTTP_PROXY.
NET_CLIENT = """
import errno, socket, ssl, sys, urllib.error, urllib.request
tls = ssl.create_default_context(cafile='/workspace/cert.pem')
for url in ('http://allowed.test/user', 'https://allowed.test/tls', 'http://other.test/user'):
    try:
        with urllib.request.urlopen(url, timeout=10, context=tls) as r:
            print(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode().strip())
print(socket.gethostbyname('allowed.test'))
try:
    socket.gethostbyname('other.test')
except OSError:
    print('no such name')
try:
    socket.create_connection((sys.argv[1], 7000), timeout=10)
except OSError as e:
    print('direct:', errno.errorcode[e.errno])
"""


def _net_workspace(user, user_python, internet) -> tuple[str, str]:
    """A workspace of the user's holding the test server's certificate, and a copy of the
    test hosts file the user's proxy can read; returns both paths."""
    cert = (Path(internet.cert_dir) / "cert.pem").read_text()
    hosts = Path(internet.hosts_file).read_text()
    as_user_do(user, user_python,
               f"import os; os.makedirs('net/ws', exist_ok=True); "
               f"open('net/ws/cert.pem', 'w').write({cert!r}); "
               f"open('net/hosts', 'w').write({hosts!r})")
    return str(user.home / "net" / "ws"), str(user.home / "net" / "hosts")


def _egress_env(internet, hosts: str) -> dict[str, str]:
    return {"CORRAL_EGRESS_HOSTS": hosts, "CORRAL_EGRESS_ROUTABLE": internet.subnet,
            "CORRAL_EGRESS_UPSTREAM_ONLY": f"{internet.subnet},127.0.0.0/8"}


def _decisions(audit: Path) -> list[dict]:
    """The audit file's decisions without what differs run to run (sandbox id, duration,
    the client's port)."""
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    out = []
    for event in events:
        if event["kind"] != "net.summary":
            del event["sandbox_id"], event["duration_s"]
            event["client"] = event["client"].rpartition(":")[0]
            out.append(event)
    return out


def test_allow_net_as_a_user_goes_through_the_proxy(rootless_user, user_python, internet):
    ws, hosts = _net_workspace(rootless_user, user_python, internet)
    audit = rootless_user.home / "net" / "audit.jsonl"
    r = run_as(rootless_user, user_python, "run", "--allow-net", "allowed.test",
               "--workspace", ws, "--audit", str(audit), "--", "python3", "-I", "-c",
               NET_CLIENT, internet.allowed, env=_egress_env(internet, hosts))
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"{NO_CGROUP_LINE}corral: {net.ROOTLESS_NOTE}\n"
    assert r.stdout.splitlines() == [
        f"200 hello from {internet.allowed} for allowed.test /user",
        f"200 hello from {internet.allowed} for allowed.test /tls",
        "403 corral: egress denied: no rule allows other.test:80",
        internet.allowed, "no such name", "direct: ENETUNREACH"]
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted((e["kind"], e.get("mode"), e.get("decision"), e.get("name"), e.get("port"))
                  for e in events[:-1]) == [
        ("net.connect", "connect", "allow", "allowed.test", 443),
        ("net.connect", "http", "allow", "allowed.test", 80),
        ("net.connect", "http", "deny", "other.test", 80),
        ("net.dns", "dns", "allow", "allowed.test", 53),
        ("net.dns", "dns", "deny", "other.test", 53)]
    assert (events[-1]["kind"], events[-1]["allowed"], events[-1]["denied"]) == (
        "net.summary", 3, 2)


def test_a_denied_host_is_the_same_refusal_and_record_as_roots(rootless_user, user_python,
                                                               internet, tmp_path):
    """The same command as root and as the user: the same output and the same audit
    records, but for what differs from run to run."""
    _, hosts = _net_workspace(rootless_user, user_python, internet)
    client = ("import urllib.request, urllib.error\ntry:\n"
              " urllib.request.urlopen('http://other.test/x', timeout=10)\n"
              "except urllib.error.HTTPError as e:\n print(e.code, e.read().decode().strip())")
    args = ("run", "--allow-net", "allowed.test:80", "--", "python3", "-I", "-c", client)
    audit = rootless_user.home / "net" / "denied.jsonl"
    user = run_as(rootless_user, user_python, args[0], "--audit", str(audit), *args[1:],
                  env=_egress_env(internet, hosts))
    root_audit = tmp_path / "denied.jsonl"
    root = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", args[0], "--audit", str(root_audit),
         *args[1:]], capture_output=True, text=True, timeout=120,
        env={**os.environ, **_egress_env(internet, internet.hosts_file)})
    assert (user.returncode, root.returncode) == (0, 0), user.stderr + root.stderr
    assert user.stdout == root.stdout == (
        "403 corral: egress denied: no rule allows other.test:80\n")
    mine, roots = _decisions(audit), _decisions(root_audit)
    assert [e["decision"] for e in mine] == ["deny"]
    # the client's address: the sandbox's end of the veth as root, the gateway address
    # on its loopback rootless (the connection never leaves the sandbox's namespace)
    assert (mine[0].pop("client"), roots[0].pop("client")) == ("100.127.255.1",
                                                               "100.127.255.2")
    assert mine == roots


def test_a_rule_only_transparent_steering_serves_is_one_clear_error(rootless_user,
                                                                    user_python):
    r = run_as(rootless_user, user_python, "run", "--allow-net", "allowed.test:80",
               "--allow-net", "allowed.test:7000", "--", "true")
    assert (r.returncode, r.stdout) == (125, "")
    assert r.stderr == (
        "corral: run: allow_net: rule 'allowed.test:7000': an unprivileged sandbox reaches "
        "the network only through the HTTP proxy at http://100.127.255.1:3128 (HTTP_PROXY, "
        "HTTPS_PROXY); a client of port 7000 needs transparent steering, a BPF sk_lookup "
        "program, which needs CAP_BPF and CAP_NET_ADMIN on the host; allow port 80 or 443 "
        "(or no port), or run as root\n")


def test_secrets_ride_the_rootless_proxy(rootless_user, user_python, internet):
    """A secret bound to allowed.test: inside, a placeholder; CONNECT to its host on 443 is
    intercepted, so the server gets the value in the path and the sandbox sees the
    placeholder in the answer; toward another host the placeholder is refused."""
    ws, hosts = _net_workspace(rootless_user, user_python, internet)
    value = "sk-rootless-" + os.urandom(8).hex()
    client = (
        "import os, urllib.request, urllib.error\n"
        "key = os.environ['API_KEY']\n"
        "print(key.startswith('corral_secret_'))\n"
        "with urllib.request.urlopen('https://allowed.test/' + key, timeout=10) as r:\n"
        "    print(r.read().decode() == 'hello from ' + os.environ['ALLOWED']"
        " + ' for allowed.test /' + key)\n"
        "try:\n"
        "    urllib.request.urlopen('http://other.test/' + key, timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode().strip())\n")
    audit = rootless_user.home / "net" / "secrets.jsonl"
    r = run_as(rootless_user, user_python, "run", "--secret", "API_KEY@allowed.test",
               "--allow-net", "other.test:80", "--audit", str(audit), "--env",
               f"ALLOWED={internet.allowed}", "--", "python3", "-I", "-c", client,
               env={**_egress_env(internet, hosts), "API_KEY": value,
                    "CORRAL_EGRESS_UPSTREAM_CA": f"{ws}/cert.pem"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "True", "True",
        "403 corral: egress denied: the request carries a secret's placeholder"]
    assert (internet.allowed, "allowed.test", "/" + value) in internet.http_seen
    assert value not in r.stdout + r.stderr + audit.read_text()
    blocked = [json.loads(line) for line in audit.read_text().splitlines()
               if json.loads(line)["kind"] == "net.secret"]
    assert [(e["action"], e["secret"], e["name"]) for e in blocked] == [
        ("blocked-exfiltration", "API_KEY", "other.test")]


def test_allow_net_through_a_users_daemon(rootless_user, user_python, internet):
    """The daemon (threads: the sockets are made by a program it execs) serves a
    sandbox's egress from its own proxy, as the user."""
    _, hosts = _net_workspace(rootless_user, user_python, internet)
    with users_daemon(rootless_user, user_python, "corral-net",
                      _egress_env(internet, hosts)) as sock:
        created = run_as(rootless_user, user_python, "create", "--socket", sock,
                         "--allow-net", "allowed.test")
        assert created.returncode == 0, created.stderr
        sb = created.stdout.strip()
        r = run_as(rootless_user, user_python, "exec", "--socket", sock, sb, "--", "python3",
                   "-I", "-c", "import urllib.request as u\n"
                   "print(u.urlopen('http://allowed.test/d', timeout=10).read().decode())")
        assert (r.returncode, r.stdout) == (
            0, f"hello from {internet.allowed} for allowed.test /d\n"), r.stderr
        # inspect knows this kind of egress: lo only, no route, nothing to flag
        r = run_as(rootless_user, user_python, "inspect", "--socket", sock, sb)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"note: {net.ROOTLESS_NOTE}\n" in r.stdout
        assert r.stdout.endswith("matches the spec\n")
        assert run_as(rootless_user, user_python, "destroy", "--socket", sock,
                      sb).returncode == 0


def test_the_sandbox_cannot_take_over_its_proxy_sockets(rootless_user, user_python):
    """The listener and resolver live in the sandbox's own namespace: its processes can
    neither bind beside them (no SO_REUSEADDR/SO_REUSEPORT on ours) nor remove the
    address they are bound to (no capabilities)."""
    code = (
        "import errno, socket, subprocess\n"
        "def bind(kind, host, port):\n"
        "    s = socket.socket(socket.AF_INET, kind)\n"
        "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "    try:\n"
        "        s.bind((host, port))\n"
        "        return 'bound'\n"
        "    except OSError as e:\n"
        "        return errno.errorcode[e.errno]\n"
        "print(bind(socket.SOCK_STREAM, '100.127.255.1', 3128),"
        " bind(socket.SOCK_STREAM, '0.0.0.0', 3128),"
        " bind(socket.SOCK_DGRAM, '100.127.255.1', 53))\n"
        "r = subprocess.run(['ip', 'addr', 'del', '100.127.255.1/32', 'dev', 'lo'],"
        " capture_output=True, text=True)\n"
        "print(r.returncode, r.stderr.strip())\n"
        "print(subprocess.run(['ip', '-4', '-br', 'addr', 'show', 'dev', 'lo'],"
        " capture_output=True, text=True).stdout.split()[2:])\n")
    r = run_as(rootless_user, user_python, "run", "--allow-net", "allowed.test", "--",
               "python3", "-I", "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "EADDRINUSE EADDRINUSE EACCES",
        "2 RTNETLINK answers: Operation not permitted",
        "['127.0.0.1/8', '100.127.255.1/32']"]
