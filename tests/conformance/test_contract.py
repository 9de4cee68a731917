"""The sandbox contract, one body per test, run on every backend (native and docker).

Whatever runs the sandbox, a caller sees the same thing: output streams and exit codes,
stdin, signals as negative return codes, the spec's timeout and memory limit as reasons,
CommandNotFound, a workspace shared by commands and owned by the sandbox's id on the host,
a read-only system, a writable /tmp, no network but loopback, no host root, the spec's
environment and hostname, and nothing left once the sandbox is destroyed.
"""

from __future__ import annotations

import errno
import os
import signal

import pytest

from corral.sandbox import CommandNotFound, ExitReason, SandboxSpec, ids
from corral.sandbox.backends import open_sandbox

from ..processes import alive, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20


def spec(backend: str, **fields) -> SandboxSpec:
    fields.setdefault("memory_bytes", 128 * MiB)
    return SandboxSpec(backend=backend, **fields)


def sh(sb, script: str, input: bytes | None = None):
    proc = sb.exec(["/bin/sh", "-c", script])
    out, err = proc.communicate(input)
    return proc, out, err


def test_output_streams_and_exit_code(backend):
    with open_sandbox(spec(backend)) as sb:
        proc, out, err = sh(sb, "echo out; echo err >&2; exit 42")
    assert (out, err) == (b"out\n", b"err\n")
    assert (proc.returncode, proc.reason) == (42, ExitReason.EXITED)


def test_stdin_reaches_the_command(backend):
    payload = os.urandom(300_000)
    with open_sandbox(spec(backend)) as sb:
        proc = sb.exec(["sha256sum"])
        out, _ = proc.communicate(payload)
    import hashlib

    assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    assert proc.returncode == 0


def test_killed_by_a_signal_is_a_negative_return_code(backend):
    with open_sandbox(spec(backend)) as sb:
        proc, _, _ = sh(sb, "kill -HUP $$")
    assert (proc.returncode, proc.reason) == (-signal.SIGHUP, ExitReason.SIGNALED)


def test_timeout_kills_the_command_and_says_so(backend):
    with open_sandbox(spec(backend, timeout_s=1.0)) as sb:
        proc = sb.exec(["sleep", "60"])
        proc.communicate()
        again, out, _ = sh(sb, "echo still-here")
    assert (proc.returncode, proc.reason) == (-signal.SIGKILL, ExitReason.TIMEOUT)
    assert (again.returncode, out) == (0, b"still-here\n")


def test_memory_limit_kill_is_an_oom(backend):
    with open_sandbox(spec(backend, memory_bytes=48 * MiB)) as sb:
        proc = sb.exec(["python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"])
        proc.communicate()
    assert (proc.returncode, proc.reason) == (-signal.SIGKILL, ExitReason.OOM)


def test_missing_command_is_command_not_found(backend):
    with open_sandbox(spec(backend)) as sb:
        with pytest.raises(CommandNotFound) as info:
            sb.exec(["/no/such/program"])
        proc, out, _ = sh(sb, "echo usable")
    assert info.value.errno == errno.ENOENT
    assert out == b"usable\n"


def test_workspace_is_shared_and_owned_by_the_sandbox_id(backend):
    with open_sandbox(spec(backend)) as sb:
        sh(sb, "echo data > /workspace/file")
        _, out, _ = sh(sb, "pwd; cat file")
        st = os.stat(os.path.join(sb.workspace, "file"))
        workspace = sb.workspace
        base = sb.spec.uid_base  # the sandbox's own range, taken at start
    assert out == b"/workspace\ndata\n"
    assert (st.st_uid, st.st_gid) == (base, base)
    assert not os.path.exists(workspace)  # a temporary workspace goes with the sandbox


def test_a_callers_workspace_stays(backend, tmp_path):
    os.chmod(tmp_path, 0o777)
    with open_sandbox(spec(backend, workspace=str(tmp_path))) as sb:
        proc, _, _ = sh(sb, "echo kept > /workspace/result")
    assert proc.returncode == 0
    assert (tmp_path / "result").read_text() == "kept\n"


def test_read_only_bind_mount(backend, tmp_path):
    (tmp_path / "in.txt").write_text("input\n")
    os.chmod(tmp_path, 0o755)
    s = SandboxSpec.build(ro=[f"{tmp_path}:/data"], backend=backend)
    with open_sandbox(s) as sb:
        _, out, _ = sh(sb, "cat /data/in.txt")
        proc, _, err = sh(sb, "echo x > /data/new")
    assert out == b"input\n"
    assert proc.returncode != 0 and b"Read-only file system" in err
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_environment_and_hostname(backend):
    s = SandboxSpec.build(env=["GREETING=hi"], hostname="probe-host", backend=backend)
    with open_sandbox(s) as sb:
        proc = sb.exec(["/bin/sh", "-c", "echo $GREETING $EXTRA $HOME; hostname"],
                       env={"EXTRA": "more"})
        out, _ = proc.communicate()
    assert out == b"hi more /workspace\nprobe-host\n"


def test_system_is_read_only_and_tmp_is_writable(backend):
    with open_sandbox(spec(backend)) as sb:
        etc, _, etc_err = sh(sb, "echo x > /etc/corral-probe")
        usr, _, _ = sh(sb, "echo x > /usr/corral-probe")
        tmp, out, _ = sh(sb, "echo scratch > /tmp/f && cat /tmp/f && rm /tmp/f")
    assert etc.returncode != 0 and b"Read-only file system" in etc_err
    assert usr.returncode != 0
    assert (tmp.returncode, out) == (0, b"scratch\n")


def test_no_network_but_loopback(backend):
    with open_sandbox(spec(backend)) as sb:
        _, out, _ = sh(sb, "cat /proc/net/dev")
    interfaces = sorted(line.split(":")[0].strip() for line in out.decode().splitlines()[2:])
    assert interfaces == ["lo"]


def test_commands_are_an_unprivileged_id_on_the_host(backend):
    with open_sandbox(spec(backend)) as sb:
        proc = sb.exec(["sleep", "30"])
        try:
            assert wait_until(lambda: _host_sleep(sb) is not None)
            status = _host_status(_host_sleep(sb))
        finally:
            proc.kill()
            proc.communicate()
        base = sb.spec.uid_base  # the sandbox's own range, taken at start
    pool = ids.pool()
    assert pool.start <= base < pool.end
    assert status["Uid"].split() == [str(base)] * 4
    assert status["CapEff"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def _host_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _host_sleep(sb) -> int | None:
    for pid in sb.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\x0030\x00":
                    return pid
        except OSError:
            pass
    return None


FORK_UNTIL_REFUSED = """
import errno, os, signal
n = 0
try:
    while n < 100:
        if os.fork() == 0:
            signal.pause()
            os._exit(0)
        n += 1
except OSError as exc:
    print(n, errno.errorcode[exc.errno])
"""


def test_pids_limit_stops_forking(backend):
    with open_sandbox(spec(backend, pids_max=24)) as sb:
        proc = sb.exec(["python3", "-c", FORK_UNTIL_REFUSED])
        out, _ = proc.communicate()
    forked, error = out.split()
    assert error == b"EAGAIN"
    assert 10 <= int(forked) < 24


def test_destroy_ends_every_process_and_is_idempotent(backend):
    sb = open_sandbox(spec(backend))
    try:
        sh(sb, "(setsid sleep 1000 &) ; sleep 1000 > /dev/null 2>&1 &")
        assert wait_until(lambda: len(sb.pids()) >= 3)
        pids = sb.pids()
    finally:
        sb.destroy()
    assert wait_until(lambda: not any(alive(p) for p in pids))
    sb.destroy()
    assert sb.state == "destroyed"


def test_rlimits(backend):
    with open_sandbox(spec(backend, nofile=200, fsize_bytes=3 * MiB)) as sb:
        _, out, _ = sh(sb, "ulimit -n; ulimit -Hn; ulimit -c; ulimit -f")
    # dash reports the file size limit in 512-byte blocks
    assert out.split() == [b"200", b"200", b"0", str(3 * MiB // 512).encode()]


SPIN = """
import os, time
end = time.monotonic() + 1.0
while time.monotonic() < end:
    pass
t = os.times()
print(t.user + t.system)
"""


def test_cpu_quota_throttles_a_busy_loop(backend):
    """A tenth of a core for one wall-clock second: far less than a second of CPU."""
    with open_sandbox(spec(backend, cpus=0.1)) as sb:
        proc = sb.exec(["python3", "-c", SPIN])
        out, _ = proc.communicate()
    assert proc.returncode == 0
    assert 0 < float(out) < 0.5
