"""`corral run`, `corral probe` and `corral doctor` as an ordinary user, no setuid helper of
Corral's: root inside is the user, ids 1..65535 their subordinate range (newuidmap) or
nothing (a single-id map); every unprivileged mechanism stays on; with no delegated cgroup
(v1 here) one line says so and rlimits stand in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from corral.sandbox import cgroups

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
    assert status == {"user namespaces": "ok", "subordinate ids": "ok",
                      "idmapped mounts": "ok", "cgroups": "degraded", "landlock": "ok",
                      "seccomp": "ok", "overlayfs": "ok"}
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


def test_the_daemon_as_a_user(rootless_user, user_python):
    """`corral daemon`, create, exec and inspect, all as the user: inspect shows the note
    and the sandbox's real two-line map, and finds nothing to flag."""
    sock = str(rootless_user.home / "corral.sock")
    daemon = subprocess.Popen(
        [user_python, "-m", "corral.runtime.cli", "daemon", "--socket", sock, "--state",
         str(rootless_user.home / "state")],
        user=rootless_user.uid, group=rootless_user.gid, extra_groups=[],
        env={"HOME": str(rootless_user.home), "PATH": "/usr/bin:/bin"},
        cwd=str(rootless_user.home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: daemon.poll() is not None or run_as(
            rootless_user, user_python, "ps", "--socket", sock).returncode == 0,
            timeout_s=60) and daemon.poll() is None
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
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, out


def test_allow_net_as_a_user_is_one_clear_error(rootless_user, user_python):
    r = run_as(rootless_user, user_python, "run", "--allow-net", "example.com:443", "--",
               "true")
    assert r.returncode == 125
    assert r.stderr == (
        "corral: run: sandbox setup failed at unshare(CLONE_NEWNET) 'egress namespace': "
        "EPERM Operation not permitted (--allow-net needs root: the egress link is a veth "
        "pair into a network namespace Corral owns on the host, which an unprivileged user "
        "cannot make; run without --allow-net, or as root)\n")
