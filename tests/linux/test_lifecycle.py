"""Sandbox lifecycle on a real kernel: cleanup on every path, exec over time, the CLI's codes.

Every way a sandbox can end -- normal exit, kill, timeout, OOM, a setup failure, a command
that does not exist, the caller crashing -- must leave no process, cgroup, runtime
directory or temporary workspace behind. The `no_leftovers` fixture (conftest.py) checks
that after every test; the tests here also check the specific sandbox they made.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corral.sandbox import (
    DEVNULL,
    BindMount,
    CommandNotFound,
    CorralError,
    ExitReason,
    InvalidSpec,
    Sandbox,
    SandboxSetupError,
    SandboxSpec,
    run,
    sweep,
)
from corral.sandbox.backends.native import runtime_base

from .conftest import (
    INSIDE,
    PROBES_DIR,
    MiB,
    alive,
    cgroup_dirs,
    command_names,
    probe_spec,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


def traces(sandbox_id: str, workspace: str | None) -> dict[str, object]:
    """What a sandbox leaves on the host while it exists (empty lists once it is gone)."""
    return {
        "runtime_dir": os.path.exists(os.path.join(runtime_base(), sandbox_id)),
        "cgroups": cgroup_dirs(sandbox_id),
        "workspace": bool(workspace) and os.path.exists(workspace),
    }


GONE = {"runtime_dir": False, "cgroups": [], "workspace": False}


def spec(**fields) -> SandboxSpec:
    fields.setdefault("timeout_s", 30)
    fields.setdefault("memory_bytes", 128 * MiB)
    return SandboxSpec(**fields)


# == every way a command or a sandbox ends ===================================================


def test_normal_exit():
    with Sandbox.create(spec()) as sb:
        proc = sb.exec(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
        out, err = proc.communicate()
        assert traces(sb.id, sb.workspace)["cgroups"]  # it did exist
        ident, workspace = sb.id, sb.workspace
    assert (out, err, proc.returncode, proc.reason) == (b"out\n", b"err\n", 3, ExitReason.EXITED)
    assert traces(ident, workspace) == GONE


def test_run_returns_a_completed_run():
    result = run(["/bin/sh", "-c", "cat; exit 4"], spec(), input=b"fed")
    assert (result.stdout, result.returncode, result.reason) == (b"fed", 4, ExitReason.EXITED)
    assert result.exit_status == 4


def test_killed_command_and_the_sandbox_goes_on():
    with Sandbox.create(spec()) as sb:
        proc = sb.exec(["sleep", "1000"], stdin=DEVNULL)
        proc.kill()
        proc.communicate()
        assert (proc.returncode, proc.reason) == (-signal.SIGKILL, ExitReason.SIGNALED)
        again = sb.exec(["true"])
        again.communicate()
        assert again.returncode == 0
        ident, workspace = sb.id, sb.workspace
    assert traces(ident, workspace) == GONE


def test_signal_reaches_every_command_but_pid1():
    with Sandbox.create(spec()) as sb:
        procs = [sb.exec(["sleep", "1000"], stdin=DEVNULL) for _ in range(3)]
        assert wait_until(lambda: len(sb.pids()) == 4)
        assert sb.signal(signal.SIGTERM) == 3
        for proc in procs:
            proc.communicate()
            assert (proc.returncode, proc.reason) == (-signal.SIGTERM, ExitReason.SIGNALED)
        assert alive(sb.init_pid)
        assert sb.pids() == [sb.init_pid]


def test_destroy_with_commands_still_running():
    """destroy() must not wait for the caller to reap its commands first."""
    sb = Sandbox.create(spec())
    procs = [sb.exec(["sleep", "1000"], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
             for _ in range(2)]
    pids = sb.pids()
    ident, workspace = sb.id, sb.workspace
    sb.destroy()
    for proc in procs:
        assert proc.poll() == -signal.SIGKILL
    for pid in pids:
        assert not alive(pid)
    assert traces(ident, workspace) == GONE


def test_exit_of_a_first_quick_command_is_never_lost():
    """PID 1 reports every exit. A command that ends while PID 1 is still starting up
    must be reported too: run many fresh sandboxes whose first command ends at once."""
    lost = []
    for attempt in range(400):
        with Sandbox.create(spec()) as sb:
            proc = sb.exec(["true"], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
            try:
                proc.wait(timeout=5)
            except TimeoutError:
                lost.append((attempt, command_names(sb)))
        if lost:
            break
    assert lost == []


def test_timeout():
    started = time.monotonic()
    result = run(["sleep", "30"], spec(timeout_s=0.5))
    assert (result.returncode, result.reason) == (-signal.SIGKILL, ExitReason.TIMEOUT)
    assert time.monotonic() - started < 25


def test_oom():
    result = run([*INSIDE, "balloon", "1024"], probe_spec(memory_bytes=48 * MiB))
    assert (result.returncode, result.reason) == (-signal.SIGKILL, ExitReason.OOM)
    assert result.exit_status == 137


def test_daemon_holding_the_output_pipe_dies_with_the_sandbox():
    """A double-forked daemon keeps the command's stdout open: the caller's read ends
    (EOF) only when destroy() has killed it."""
    sb = Sandbox.create(spec())
    proc = sb.exec(["/bin/sh", "-c", "echo started; (setsid sleep 1000 &)"], stdin=DEVNULL,
                   stderr=DEVNULL)
    assert proc.wait() == 0
    assert proc.stdout.readline() == b"started\n"
    assert wait_until(lambda: command_names(sb) == ["sleep"])
    pids = sb.pids()
    ident, workspace = sb.id, sb.workspace
    sb.destroy()
    assert proc.stdout.read() == b""  # EOF: the daemon's copy of the pipe is gone
    proc.stdout.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert traces(ident, workspace) == GONE


def test_destroy_is_idempotent_and_exec_after_it_raises():
    sb = Sandbox.create(spec())
    sb.destroy()
    sb.destroy()
    with pytest.raises(CorralError, match=rf"^sandbox {sb.id} is destroyed; cannot exec$"):
        sb.exec(["true"])


def test_given_workspace_is_kept(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    os.chown(workspace, 100000, 100000)  # root inside the sandbox
    with Sandbox.create(spec(workspace=str(workspace))) as sb:
        proc = sb.exec(["/bin/sh", "-c", "echo kept > /workspace/file"])
        proc.communicate()
    assert proc.returncode == 0
    assert (workspace / "file").read_text() == "kept\n"


# == setup failures ==========================================================================


def test_bind_source_that_vanished_before_start(tmp_path):
    source = tmp_path / "gone"
    source.mkdir()
    the_spec = spec(binds=(BindMount(str(source), "/data", False),))
    source.rmdir()
    before = set(os.listdir(runtime_base())) if os.path.isdir(runtime_base()) else set()
    with pytest.raises(SandboxSetupError) as info:
        Sandbox.create(the_spec)
    assert (info.value.step, info.value.path, info.value.errno) == (
        "open_tree", str(source), errno.ENOENT)
    after = set(os.listdir(runtime_base())) if os.path.isdir(runtime_base()) else set()
    assert after <= before


def test_bind_target_inside_a_read_only_host_dir(tmp_path):
    """Making the mount point would need a write to the host's /usr (read-only here)."""
    target = "/usr/corral-test-target"
    with pytest.raises(SandboxSetupError) as info:
        Sandbox.create(spec(binds=(BindMount(str(tmp_path), target, False),)))
    assert info.value.errno == errno.EROFS
    assert info.value.path is not None and info.value.path.endswith(target)
    assert not os.path.exists(target)


def test_bad_bind_source_is_a_spec_error():
    message = r"^ro: '/nonexistent/corral' does not exist on the host$"
    with pytest.raises(InvalidSpec, match=message):
        SandboxSpec.build(ro=["/nonexistent/corral"])


@pytest.mark.parametrize("argv,err", [
    (["/nonexistent"], errno.ENOENT),
    (["corral-no-such-command"], errno.ENOENT),
    (["/usr"], errno.EACCES),  # a directory
    (["/etc/passwd"], errno.EACCES),  # not executable
])
def test_command_not_found(argv, err):
    with Sandbox.create(spec()) as sb:
        with pytest.raises(CommandNotFound) as info:
            sb.exec(argv)
        assert info.value.errno == err
        assert str(info.value) == (f"argv[0]: {argv[0]!r} cannot be executed inside the "
                                   f"sandbox: {os.strerror(err)}")
        proc = sb.exec(["true"])  # the sandbox is still usable
        proc.communicate()
        assert proc.returncode == 0
        assert sb.pids() == [sb.init_pid]


def test_command_not_found_in_run_cleans_up():
    with pytest.raises(CommandNotFound):
        run(["/nonexistent"], spec())


# == several commands over time =============================================================


def test_commands_share_one_sandbox_over_time():
    with Sandbox.create(spec()) as sb:
        first = sb.exec(["/bin/sh", "-c",
                         "echo token-$$ > /tmp/state; echo $$; readlink /proc/self/ns/mnt"])
        out1, _ = first.communicate()
        time.sleep(0.1)
        second = sb.exec(["/bin/sh", "-c", "cat /tmp/state; readlink /proc/self/ns/mnt"])
        out2, _ = second.communicate()
        assert alive(sb.init_pid)
    pid_of_first, ns1 = out1.decode().split()
    state, ns2 = out2.decode().split()
    assert state == f"token-{pid_of_first}"  # /tmp kept what the first command wrote
    assert ns1 == ns2  # the same mount namespace


def test_exec_environment_and_cwd():
    with Sandbox.create(spec(env=(("FROM_SPEC", "1"),))) as sb:
        proc = sb.exec(["/bin/sh", "-c", "pwd; echo $FROM_SPEC $EXTRA $HOME"],
                       env={"EXTRA": "2"})
        out, _ = proc.communicate()
    assert out == b"/workspace\n1 2 /workspace\n"


def test_pass_fds():
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        with Sandbox.create(spec()) as sb:
            proc = sb.exec(["/bin/sh", "-c", "echo via-fd-5 >&5"], pass_fds={5: write_end})
            proc.communicate()
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 100) == b"via-fd-5\n"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


# == the caller crashes =====================================================================

CRASHING_CALLER = textwrap.dedent("""
    import json, os, signal, sys, time
    from corral.sandbox import DEVNULL, Sandbox, SandboxSpec
    sb = Sandbox.create(SandboxSpec(memory_bytes=64 << 20, batch=sys.argv[2] == "batch"))
    proc = sb.exec(["sleep", "1000"], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
    print(json.dumps({"id": sb.id, "init_pid": sb.init_pid, "workspace": sb.workspace,
                      "runtime_dir": sb.runtime_dir, "pids": sb.pids(),
                      "cgroup": sb._cgroup.paths}), flush=True)
    if sys.argv[1] == "exit":
        os._exit(9)
    time.sleep(1000)  # the test SIGKILLs us here
""")


@pytest.mark.parametrize("how,group", [("exit", "corral"), ("sigkill", "corral"),
                                       ("sigkill", "batch")])
def test_caller_crash_kills_the_sandbox_and_sweep_removes_the_rest(how, group):
    # batch: a deep task's sandbox, whose shim was killed; its cgroup is in corral-batch/,
    # which only its state.json says
    caller = subprocess.Popen([sys.executable, "-c", CRASHING_CALLER, how, group],
                              stdout=subprocess.PIPE)
    try:
        info = json.loads(caller.stdout.readline())
        top = "corral-batch" if group == "batch" else "corral"
        assert all(p.endswith(f"/{top}/{info['id']}") for p in info["cgroup"]), info
        if how == "sigkill":
            caller.send_signal(signal.SIGKILL)
        assert caller.wait(timeout=30) == (-9 if how == "sigkill" else 9)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        caller.stdout.close()
    # PR_SET_PDEATHSIG: PID 1 dies with its creator, and with it the whole PID namespace.
    assert wait_until(lambda: not any(alive(p) for p in info["pids"]), timeout_s=10), info
    assert os.path.exists(info["runtime_dir"])  # left for sweep(): nobody was there to clean
    removed = sweep()
    assert info["id"] in removed
    assert traces(info["id"], info["workspace"]) == GONE


def test_a_cgroup_still_busy_at_sweep_is_swept_again_later(monkeypatch):
    # after a crash with many sandboxes, a cgroup can stay busy while its PID 1s die: the
    # sweep keeps that sandbox's state (the next sweep retries) instead of forgetting a
    # cgroup nobody could name afterwards
    from corral.sandbox import cgroups
    from corral.sandbox.errors import SandboxSetupError

    caller = subprocess.Popen([sys.executable, "-c", CRASHING_CALLER, "exit", "corral"],
                              stdout=subprocess.PIPE)
    info = json.loads(caller.stdout.readline())
    caller.wait(timeout=30)
    caller.stdout.close()
    assert wait_until(lambda: not any(alive(p) for p in info["pids"]), timeout_s=10), info
    real_destroy = cgroups.Cgroup.destroy

    def busy(self):
        raise SandboxSetupError("cgroup rmdir", self.paths[0], errno.EBUSY, "a process remains")

    monkeypatch.setattr(cgroups.Cgroup, "destroy", busy)
    assert info["id"] not in sweep()
    assert os.path.exists(info["runtime_dir"])  # kept for the next sweep
    monkeypatch.setattr(cgroups.Cgroup, "destroy", real_destroy)
    assert info["id"] in sweep()
    assert traces(info["id"], info["workspace"]) == GONE


def test_sweep_keeps_live_sandboxes():
    with Sandbox.create(spec()) as sb:
        assert sb.id not in sweep()
        assert traces(sb.id, sb.workspace)["runtime_dir"]
        proc = sb.exec(["true"])
        proc.communicate()
        assert proc.returncode == 0


# == the CLI ================================================================================


def corral_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("corral")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "corral.runtime.cli"]
    return subprocess.run([*argv, *args], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("argv,code", [
    (["--", "/bin/sh", "-c", "exit 7"], 7),
    (["--", "/bin/sh", "-c", "exit 0"], 0),
    (["--", "/bin/sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
    (["--", "/bin/sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
])
def test_cli_exit_status_is_the_program_own(argv, code):
    result = corral_cli("run", *argv)
    assert result.returncode == code
    assert result.stderr == b""


def test_cli_run_is_one_shot_with_a_scratch_workspace_unless_given_one(tmp_path):
    """`corral run` hands its command to PID 1 (the command is pid 2: no join helper or
    relay ran) and, with no --workspace, gives it a scratch /workspace of its own; with
    --workspace the directory is the command's, as before."""
    result = corral_cli("run", "--", "/bin/sh", "-c",
                        "echo $$; touch /workspace/made; grep ' /workspace ' /proc/self/mounts")
    assert result.returncode == 0, result.stderr
    pid, mount = result.stdout.decode().splitlines()
    assert pid == "2"
    assert mount.split()[2] == "tmpfs"
    (tmp_path / "given").write_text("x")
    result = corral_cli("run", "--workspace", str(tmp_path), "--", "/bin/sh", "-c",
                        "echo $$; cat /workspace/given; touch /workspace/made")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["2", "x"]
    assert (tmp_path / "made").exists()


def test_cli_streams_output():
    result = corral_cli("run", "--", "/bin/sh", "-c", "echo to-out; echo to-err >&2")
    assert (result.stdout, result.stderr, result.returncode) == (b"to-out\n", b"to-err\n", 0)


def test_cli_timeout():
    result = corral_cli("run", "--timeout", "500ms", "--", "sleep", "30")
    assert result.returncode == 124
    assert one_line(result.stderr) == "corral: sleep: killed after the 0.5s timeout"


def test_cli_oom():
    result = corral_cli("run", "--memory", "48M", "--ro", f"{PROBES_DIR}:/probes", "--",
                        *INSIDE, "balloon", "1024")
    assert result.returncode == 137
    assert one_line(result.stderr) == "corral: python3: killed by the 48M memory limit (OOM)"


@pytest.mark.parametrize("command", ["/nonexistent", "corral-no-such-command"])
def test_cli_command_not_found(command):
    result = corral_cli("run", "--", command)
    assert result.returncode == 127
    assert one_line(result.stderr) == (f"corral: run: argv[0]: {command!r} cannot be executed "
                                       "inside the sandbox: No such file or directory")


def test_cli_setup_failure(tmp_path):
    result = corral_cli("run", "--ro", f"{tmp_path}:/usr/corral-test-target", "--", "true")
    assert result.returncode == 125
    line = one_line(result.stderr)
    assert line.startswith("corral: run: sandbox setup failed at ")
    assert "EROFS" in line


def bad_profile(tmp_path: Path) -> str:
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    return str(path)


@pytest.mark.parametrize("flags,field", [
    (["--profile", "no-such-profile"], "profile"),
    (["--profile", "BAD_JSON"], "profile"),
    (["--memory", "12Q"], "memory"),
    (["--tmp-size", "lots"], "tmp_size"),
    (["--pids", "many"], "pids"),
    (["--cpus", "half"], "cpus"),
    (["--timeout", "soon"], "timeout"),
    (["--workspace", "/nonexistent/corral"], "workspace"),
    (["--ro", "/nonexistent/corral"], "ro"),
    (["--env", "NOEQUALS"], "env"),
])
def test_cli_usage_error_names_the_field(tmp_path, flags, field):
    flags = [bad_profile(tmp_path) if f == "BAD_JSON" else f for f in flags]
    result = corral_cli("run", *flags, "--", "true")
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"corral: run: {field}: ")


def test_cli_without_a_command():
    result = corral_cli("run")
    assert result.returncode == 2
    assert one_line(result.stderr) == ("corral: run: no command given; usage: corral run "
                                       "[OPTIONS] -- CMD [ARGS...]")


def test_cli_unknown_option():
    result = corral_cli("run", "--no-such-option", "--", "true")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr.decode()
    assert result.stderr.decode().splitlines()[-1] == (
        "corral: error: unrecognized arguments: --no-such-option")


def test_a_destroy_whose_cgroup_stays_busy_is_tried_again_by_the_next(monkeypatch):
    """The removal raised (a process would not leave the cgroup): the sandbox keeps what it
    could not remove, so a second destroy() removes it rather than leaving it to a sweep."""
    from corral.sandbox import cgroups

    sb = Sandbox(SandboxSpec())
    sb.start()
    ident, workspace = sb.id, sb.workspace
    real = cgroups.Cgroup.destroy
    calls = []

    def busy_once(self):
        calls.append(self.name)
        if len(calls) == 1:
            raise SandboxSetupError("cgroup rmdir", self.paths[0], errno.EBUSY,
                                    "a process remains")
        real(self)

    monkeypatch.setattr(cgroups.Cgroup, "destroy", busy_once)
    with pytest.raises(SandboxSetupError):
        sb.destroy()
    assert traces(ident, workspace)["cgroups"]  # still there after the failed removal
    sb.destroy()
    assert calls == [ident, ident]
    assert traces(ident, workspace) == GONE
