"""The base mount namespace every root PID 1 copies its own from (contain.base_mount_namespace).

It keeps what the setup reaches by path and none of the mounts the runtime holds (a
workspace per sandbox, which made every create copy, privatize and detach all of them);
what the runtime mounts stays in its own namespace and still reaches sandboxes, detached.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from corral.sandbox import BindMount, SandboxSpec, contain, mounts, run


def _mount_tmpfs(path) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "corral-test", str(path)],
                   check=True)


def _unmount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _mount_points_in(ns_fd: int) -> list[str]:
    shown = subprocess.run(["nsenter", f"--mount=/proc/self/fd/{ns_fd}", "cat",
                            "/proc/self/mountinfo"], pass_fds=(ns_fd,), capture_output=True,
                           check=True)
    return [line.split()[4] for line in shown.stdout.decode().splitlines()]


def test_base_namespace_keeps_none_of_the_runtimes_mounts(tmp_path):
    tree = tmp_path / "corral"
    (tree / "sandboxes" / "sbx-test").mkdir(parents=True)
    earlier, later = tree / "earlier-workspace", tree / "later-workspace"
    _mount_tmpfs(earlier)  # as a restarted daemon finds its sandboxes' workspaces
    try:
        ns_fd = contain.base_mount_namespace(str(tree))
        try:
            _mount_tmpfs(later)
            points = _mount_points_in(ns_fd)
            assert str(earlier) not in points
            assert str(later) not in points
            assert {"/", "/proc", "/dev"} <= set(points)
            # the runtime's own namespace keeps both: only the copy leaves them out
            assert os.path.ismount(earlier) and os.path.ismount(later)
        finally:
            os.close(contain._base_namespaces.pop(str(tree)))
    finally:
        _unmount(later)
        _unmount(earlier)


def test_a_mount_the_runtime_makes_later_still_reaches_a_sandbox(tmp_path):
    """Mounted after the base namespace exists (a sandbox started first makes it), so only
    the detached clone of the bind can show it."""
    run(["true"], SandboxSpec())
    data = tmp_path / "data"
    _mount_tmpfs(data)
    try:
        (data / "note").write_text("mounted later")
        spec = SandboxSpec(binds=(BindMount(str(data), "/data", writable=False),))
        done = run(["cat", "/data/note"], spec)
        assert (done.returncode, done.stdout) == (0, b"mounted later")
    finally:
        _unmount(data)


def test_masked_proc_directories_are_empty_and_read_only():
    """Each is the sandbox's empty directory bound read-only (no tmpfs of its own); one
    this kernel lacks stays absent."""
    script = ("import os, sys\n"
              "for path in sys.argv[1:]:\n"
              "    if not os.path.isdir(path):\n"
              "        print(path, 'absent')\n"
              "        continue\n"
              "    try:\n"
              "        os.mkdir(path + '/x')\n"
              "    except OSError as e:\n"
              "        print(path, os.listdir(path), e.errno)\n")
    done = run(["python3", "-c", script, *mounts.PROC_MASKED_DIRS], SandboxSpec())
    expected = [f"{p} [] 30" if os.path.isdir(p) else f"{p} absent"  # 30: EROFS
                for p in mounts.PROC_MASKED_DIRS]
    assert done.stdout.decode().splitlines() == expected, done.stderr


def test_every_sandbox_binds_one_shared_empty_directory(tmp_path):
    """The directory bound over the masked /proc directories is one per sandboxes
    directory (beside it), made once, empty and read-only to all; none is made per
    sandbox. One that holds something is refused, not bound."""
    from corral.sandbox import Sandbox
    from corral.sandbox.backends.native import empty_dir, runtime_base
    from corral.sandbox.errors import SandboxSetupError

    sb = Sandbox.create(SandboxSpec())
    try:
        assert sorted(os.listdir(sb.runtime_dir)) == ["state.json"]
        shared = empty_dir(runtime_base())
        assert shared == os.path.join(os.path.dirname(runtime_base()), "empty")
        st = os.stat(shared)
        assert (st.st_mode & 0o7777, st.st_uid, os.listdir(shared)) == (0o555, 0, [])
    finally:
        sb.destroy()
    planted = tmp_path / "empty"
    planted.mkdir()
    (planted / "x").write_text("not empty")
    with pytest.raises(SandboxSetupError, match="not an empty directory"):
        empty_dir(str(tmp_path / "sandboxes"))
