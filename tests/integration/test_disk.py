"""Disk: a hostile tenant fills only its own capped workspace; a full state disk is refused
cleanly (RESOURCE_EXHAUSTED), SIGTERM still ends the daemon, and a restart on the full disk
works and removes what dead tasks left.

The daemon's state directory is a small tmpfs here, as on a node whose disk is nearly full.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from corral.runtime.client import ClientError

from .daemon_harness import DaemonProcess, alive, collect_exec, wait_until
from .smallfs import fill, free_bytes, small_tmpfs

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20
WORKSPACE = 16 * MiB
FILL_FILES = ("import os\ni = 0\ntry:\n    while True:\n"
              "        open(f'/workspace/f{i}', 'w').close()\n        i += 1\n"
              "except OSError as e:\n    print(i, e.errno)\n")


def _workspace_used(path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _mounted(path) -> bool:
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def _end_leftovers(ws_root) -> None:
    """After a failed test: end the task shims that own workspaces in this test's root and
    unmount what is left, so the tmp directory can be removed."""
    for owner in ws_root.glob("*.owner") if ws_root.exists() else ():
        try:
            pid = json.loads(owner.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        if pid != os.getpid() and alive(pid):
            os.kill(pid, signal.SIGKILL)
    for path in ws_root.iterdir() if ws_root.exists() else ():
        if _mounted(path):
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_hostile_tenant_fills_only_its_workspace_and_a_full_disk_is_survived(tmp_path):
    state, ws_root = tmp_path / "state", tmp_path / "ws"
    with small_tmpfs(state, "48M"):
        daemon = DaemonProcess(tmp_path, args=(
            "--disk-reserve", "2M", "--workspace-root", str(ws_root),
            "--workspace-size", "16M", "--workspace-inodes", "1000"))
        daemon.start()
        try:
            evil, good = daemon.client(tenant="evil"), daemon.client(tenant="good")
            assert oct(os.stat(ws_root).st_mode & 0o777) == "0o700"
            state_free = free_bytes(state)

            # A task writes until its workspace is full, then stays.
            task = evil.submit_task(["sh", "-c", "dd if=/dev/zero of=/workspace/fill bs=1M; "
                                                 "sleep 600"], memory_bytes=256 * MiB)
            task_ws = ws_root / f"{task.id}-1"
            assert wait_until(lambda: _workspace_used(task_ws) >= WORKSPACE - MiB, timeout_s=60)
            assert _mounted(task_ws)
            # A sandbox does the same with bytes, then with files (inodes).
            sb = evil.create_sandbox(memory_bytes=256 * MiB)
            res = collect_exec(evil.exec(sb.id, ["dd", "if=/dev/zero", "of=/workspace/fill",
                                                 "bs=1M"]))
            assert res.returncode == 1
            assert b"No space left on device" in res.stderr
            res = collect_exec(evil.exec(sb.id, ["python3", "-c", FILL_FILES]))
            files, err = res.stdout.split()
            assert int(err) == 28 and 900 < int(files) < 1000  # ENOSPC at the inode cap
            # None of it reached the state filesystem.
            assert free_bytes(state) > state_free - 2 * MiB
            assert daemon.health("corral.v1.Sandboxes") == "SERVING"

            # Another tenant's Create and Exec still work.
            other = good.create_sandbox()
            res = collect_exec(good.exec(other.id, ["echo", "hi"]))
            assert (res.returncode, res.stdout) == (0, b"hi\n")

            # Something else fills the state disk: refused cleanly, not INTERNAL.
            fill(state / "filler")
            assert wait_until(lambda: daemon.health("corral.v1.Sandboxes") == "NOT_SERVING",
                              timeout_s=10)
            with pytest.raises(ClientError) as refused:
                good.create_sandbox()
            assert refused.value.code.name == "RESOURCE_EXHAUSTED"
            assert "free space there" in str(refused.value)

            # The task's shim dies while the daemon is down: its attempt is dead.
            runner = json.loads((state / "tasks" / task.id / "attempt-1" / "runner.json")
                                .read_text())
            # SIGTERM ends the daemon in bounded time, with its last record written.
            assert daemon.stop(timeout_s=30) == 0
            assert "corral daemon stopped after" in daemon.log()
            os.kill(runner["pid"], signal.SIGKILL)
            assert wait_until(lambda: not alive(runner["pid"]), timeout_s=10)

            # A restart on the still-full disk comes up (refusing work) and removes the
            # dead attempt's workspace.
            daemon.start(status="NOT_SERVING")
            assert not task_ws.exists() and not _mounted(task_ws)
            assert f"removed workspace {task.id}-1: its owner is gone" in daemon.log()
            good = daemon.client(tenant="good")
            with pytest.raises(ClientError) as refused:
                good.create_sandbox()
            assert refused.value.code.name == "RESOURCE_EXHAUSTED"

            # Room again: serving again.
            (state / "filler").unlink()
            assert wait_until(lambda: daemon.health("corral.v1.Sandboxes") == "SERVING",
                              timeout_s=10)
            again = good.create_sandbox()
            res = collect_exec(good.exec(again.id, ["echo", "back"]))
            assert (res.returncode, res.stdout) == (0, b"back\n")
            assert daemon.stop(timeout_s=30) == 0
        except BaseException:
            daemon.ensure_stopped()
            _end_leftovers(ws_root)
            raise
    assert not any(_mounted(p) for p in ws_root.iterdir())


def test_sigterm_ends_the_daemon_when_its_last_record_cannot_be_written(tmp_path):
    """No reserve: the final audit append fails; the daemon logs it and still exits."""
    state = tmp_path / "state"
    with small_tmpfs(state, "32M"):
        daemon = DaemonProcess(tmp_path, args=(
            "--disk-reserve", "0", "--workspace-root", str(tmp_path / "ws")))
        daemon.start()
        try:
            client = daemon.client()
            sb = client.create_sandbox()
            fill(state / "filler")
            assert wait_until(lambda: daemon.health("corral.v1.Sandboxes") == "NOT_SERVING",
                              timeout_s=10)
            started = time.monotonic()
            assert daemon.stop(timeout_s=30) == 1
            assert time.monotonic() - started < 30
            log = daemon.log()
            assert "stopping: audit daemon.stop failed: " in log
            assert "corral daemon stopped after" in log and "with failures: " in log
            assert wait_until(lambda: not alive(sb.init_pid), timeout_s=10)
        finally:
            daemon.ensure_stopped()
