"""One-shot sandboxes (run(), Sandbox.start_running): PID 1 starts the command itself.

The command must be contained exactly as a joined one (exec) is, report through PID 1 as
one does, and leave nothing behind on any path; the conftest's leak check runs after each
test (no runtime directory, cgroup, workspace or process of ours may remain).
"""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

from corral.sandbox import CommandNotFound, ExitReason, Sandbox, SandboxSpec, run

from .conftest import INSIDE, MiB, inside, probe_spec

NAMESPACES = ("user", "pid", "mnt", "net", "uts", "ipc", "cgroup")


def _namespaces(pid: int) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in NAMESPACES}


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def test_output_input_and_exit_code():
    result = run(["/bin/sh", "-c", "cat; echo out; echo err >&2; exit 7"], input=b"in\n")
    assert (result.stdout, result.stderr) == (b"in\nout\n", b"err\n")
    assert (result.returncode, result.reason) == (7, ExitReason.EXITED)


def test_the_command_is_pid_1s_first_child_without_a_join():
    """A joined command is pid 3 at the earliest (its relay takes 2); PID 1's own is 2."""
    p = inside("pids_settled", "0")
    assert p.ok, p
    assert p.value["self"] == 2
    assert p.value["all"] == [1, 2]


@pytest.mark.parametrize("argv,spec,ending", [
    (["/bin/sh", "-c", "kill -TERM $$"], SandboxSpec(), (-signal.SIGTERM, ExitReason.SIGNALED)),
    (["sleep", "30"], SandboxSpec(timeout_s=0.5), (-signal.SIGKILL, ExitReason.TIMEOUT)),
    ([*INSIDE, "balloon", "1024"], probe_spec(memory_bytes=48 * MiB),
     (-signal.SIGKILL, ExitReason.OOM)),
], ids=["signaled", "timeout", "oom"])
def test_how_the_one_shot_command_ended(argv, spec, ending):
    """PID 1's report on the status pipe, as for a joined command: signal, the wall-clock
    limit (enforced by wait), the memory cgroup's OOM kill."""
    started = time.monotonic()
    sb = Sandbox(spec)
    try:
        proc = sb.start_running(argv)
        assert proc.ns_pid == 2  # PID 1's own child: no join ran
        proc.wait()
    finally:
        sb.destroy()
    assert (proc.returncode, proc.reason) == ending
    assert time.monotonic() - started < 25


def test_exec_failure_is_the_error_a_joined_command_gets():
    with Sandbox.create(SandboxSpec()) as sb, pytest.raises(CommandNotFound) as joined:
        sb.exec(["/no/such/program"])
    with pytest.raises(CommandNotFound) as oneshot:
        run(["/no/such/program"])
    assert oneshot.value.errno == joined.value.errno == errno.ENOENT
    assert str(oneshot.value) == str(joined.value) == (
        "argv[0]: '/no/such/program' cannot be executed inside the sandbox: "
        "No such file or directory")


def test_seccomp_and_landlock_hold_in_the_one_shot_command():
    # clone3 fails with ENOSYS only through the filter; writing the process's own
    # /proc/self/comm (a writable mount, its own file) is refused only by landlock
    assert inside("clone3").outcome == "ENOSYS"
    assert inside("open", "/proc/self/comm", "O_WRONLY").outcome == "EACCES"


def test_contained_exactly_as_a_joined_command():
    ops = [("status",), ("rlimits",), ("sid",)]
    oneshot = [inside(*op).value for op in ops]
    with Sandbox.create(probe_spec()) as sb:
        joined = [inside(*op, sandbox=sb).value for op in ops]
    assert oneshot[0] == joined[0]  # ids, every capability set, no_new_privs, seccomp 2
    assert oneshot[0]["Seccomp"] == "2" and oneshot[0]["CapEff"] == "0000000000000000"
    assert oneshot[1] == joined[1]
    # a session leader of its own in both
    assert oneshot[2]["sid"] == oneshot[2]["pid"] and joined[2]["sid"] == joined[2]["pid"]


def test_namespaces_and_cgroup_are_pid_1s_and_a_later_exec_joins_them():
    sb = Sandbox(probe_spec())
    try:
        first = sb.start_running(["sleep", "30"])
        assert first.pid and first.ns_pid == 2
        assert _namespaces(first.pid) == _namespaces(sb.init_pid)
        assert _cgroup_of(first.pid) == _cgroup_of(sb.init_pid)
        later = sb.exec(["/bin/sh", "-c", "echo again"])
        assert later.communicate() == (b"again\n", b"")
        assert (later.returncode, later.reason) == (0, ExitReason.EXITED)
        first.kill()
        assert first.wait(timeout=10) == -signal.SIGKILL
        assert first.reason == ExitReason.SIGNALED
    finally:
        sb.destroy()
    assert sb.state == "destroyed"
    assert not os.path.exists(f"/proc/{sb.init_pid}/ns")


def test_a_command_that_fails_to_start_leaves_a_running_sandbox():
    sb = Sandbox(SandboxSpec())
    try:
        with pytest.raises(CommandNotFound):
            sb.start_running(["no-such-command-anywhere"])
        assert sb.state == "running"
        proc = sb.exec(["/bin/echo", "still here"])
        assert proc.communicate() == (b"still here\n", b"")
    finally:
        sb.destroy()


def test_destroy_ends_a_running_one_shot_command():
    sb = Sandbox(SandboxSpec())
    try:
        proc = sb.start_running(["sleep", "30"])
        pid = proc.pid
    finally:
        sb.destroy()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{pid}/ns")


def test_run_gets_a_scratch_workspace_with_the_caps_of_a_host_one(monkeypatch):
    """run()'s /workspace is a tmpfs the sandbox mounts itself: nosuid, nodev, writable,
    with the workspace caps in force, and nothing of it on the host."""
    monkeypatch.setenv("CORRAL_WORKSPACE_BYTES", str(4 * MiB))
    mounts = run(["/bin/sh", "-c", "grep ' /workspace ' /proc/self/mountinfo"]).stdout.decode()
    mount, _, filesystem = mounts.partition(" - ")
    fields, fs_fields = mount.split(), filesystem.split()
    assert (fields[4], fs_fields[0]) == ("/workspace", "tmpfs")
    assert {"rw", "nosuid", "nodev"} <= set(fields[5].split(","))
    assert "size=4096k" in fs_fields[2].split(",")
    p = inside("fill", "/workspace/big", str(16 * MiB))
    assert p.errno == "ENOSPC" and p.value["written"] <= 4 * MiB, p
    sb = Sandbox(SandboxSpec())
    try:
        proc = sb.start_running(["sleep", "30"], scratch_workspace=True)
        assert sb.workspace is None
        assert not any(name.startswith(sb.id) for name in os.listdir("/run/corral/workspaces"))
        proc.kill()
    finally:
        sb.destroy()


def test_a_sandbox_started_running_keeps_its_host_workspace_by_default():
    sb = Sandbox(SandboxSpec())
    try:
        proc = sb.start_running(["/bin/sh", "-c", "echo kept > /workspace/f"])
        assert proc.wait(timeout=10) == 0
        with open(os.path.join(sb.workspace, "f")) as f:
            assert f.read() == "kept\n"
    finally:
        sb.destroy()


def _processes_named(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return found


def test_run_returns_with_every_process_dead_and_only_directories_left_for_later():
    """run() leaves the removal of its sandbox's directories to the undertaker thread, but
    a process the command left running in the background is dead when run() returns, and
    what the thread removes it removes (the leak check runs after its flush)."""
    from corral.sandbox.undertaker import undertaker

    marker = f"corral-straggler-{os.getpid()}-{time.monotonic_ns()}"
    # `sh -c 'sleep 60; :' MARKER`: a shell named MARKER ($0) waits for its sleep
    result = run(["/bin/sh", "-c", f"sh -c 'sleep 60; :' {marker} & echo started"])
    assert (result.returncode, result.stdout) == (0, b"started\n")
    assert _processes_named(marker) == []
    undertaker.flush()
    assert undertaker.pending() == 0
