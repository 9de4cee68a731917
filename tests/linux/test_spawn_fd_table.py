"""A spawn's children share the runtime's descriptor table only until they cut their own.

The launcher and the join helper are cloned with CLONE_FILES and, as their first act, keep
a table of their own with only the descriptors below the spawn's cut (ext/_spawn.pyx,
fd_cut): O(descriptors the spawn uses), not O(descriptors the runtime holds). These tests
hold thousands of inheritable descriptors in this process (the runtime), with marker files
low and high, and check that nothing reaches a sandbox: PID 1, its first command (as
run() starts it) and a command exec'd later see exactly the descriptors they see when
this process holds none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import time

import pytest

from corral.ext import _spawn
from corral.sandbox import DEVNULL, Sandbox, SandboxSpec, run

MARKER = "corral-fd-leak-marker"
#: Inheritable descriptors held besides the markers: more than a sandbox's RLIMIT_NOFILE,
#: and spread across the park base, as a daemon with a few thousand sandboxes holds.
BALLAST = 6000
HIGH_MARKER_FD = 9000


@contextlib.contextmanager
def crowded_table():
    """This process with BALLAST + 2 extra inheritable descriptors: a memfd marker at the
    lowest free number and at HIGH_MARKER_FD, and dups of /dev/null both below and above
    the park base."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HIGH_MARKER_FD + 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), max(hard, need)))
    held: list[int] = []
    try:
        marker = os.memfd_create(MARKER, 0)  # no MFD_CLOEXEC: inheritable
        held.append(marker)
        held.append(fcntl.fcntl(marker, fcntl.F_DUPFD, HIGH_MARKER_FD))
        null = os.open("/dev/null", os.O_RDONLY)
        held.append(null)
        for i in range(BALLAST):
            base = 3 if i % 2 else _spawn.PARK_BASE
            held.append(fcntl.fcntl(null, fcntl.F_DUPFD, base))
        assert min(held) < 64 and max(held) >= HIGH_MARKER_FD
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def fds_of(pid: int) -> dict[int, str]:
    """Descriptor number -> what it points to, of a live host pid."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def wait_until_asleep(pid: int, timeout_s: float = 10.0) -> None:
    """Until the host pid sleeps in nanosleep: a `sleep` just exec'd still has the dynamic
    loader's and locale's files open for a moment (its fd 3; on a busy host, longer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(f"/proc/{pid}/wchan") as f:
            if "nanosleep" in f.read():
                return
        assert time.monotonic() < deadline, f"pid {pid} never went to sleep"
        time.sleep(0.005)


def assert_no_marker(fds: dict[int, str]) -> None:
    leaked = {n: target for n, target in fds.items() if MARKER in target}
    assert not leaked, f"the runtime's marker reached the sandbox: {leaked}"


def sandbox_views() -> dict[str, set[int]]:
    """The descriptor numbers PID 1, its first command and a later exec hold (checked for
    the marker on the way), and those a one-shot run()'s command lists itself."""
    sb = Sandbox(SandboxSpec())
    try:
        first = sb.start_running(["sleep", "30"], stdin=DEVNULL, stdout=DEVNULL,
                                 stderr=DEVNULL)
        later = sb.exec(["sleep", "30"], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
        views = {}
        for name, pid in (("init", sb.init_pid), ("first", first.pid), ("exec", later.pid)):
            if name != "init":
                wait_until_asleep(pid)
            fds = fds_of(pid)
            assert_no_marker(fds)
            views[name] = set(fds)
    finally:
        sb.destroy()
    # ls lists its own descriptors (and the directory it reads them from, its fd 3)
    done = run(["/bin/ls", "/proc/self/fd"])
    assert done.returncode == 0, done.stderr
    views["run"] = {int(name) for name in done.stdout.split()}
    return views


def test_no_descriptor_of_the_runtime_reaches_a_sandbox():
    quiet = sandbox_views()
    assert quiet["first"] == quiet["exec"] == {0, 1, 2}
    assert quiet["run"] <= {0, 1, 2, 3}
    with crowded_table():
        crowded = sandbox_views()
    assert crowded == quiet


def test_a_sandbox_keeps_its_descriptors_parked_above_the_spawns():
    """PID 1's pidfd and status pipe, which the runtime keeps as long as the sandbox
    lives, are parked at PARK_BASE and up; an exec still works through the parked pidfd
    and the next spawn's descriptors are low again."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * _spawn.PARK_BASE
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), max(hard, need)))
    sb = Sandbox(SandboxSpec())
    try:
        sb.start()
        assert sb.status_fd >= _spawn.PARK_BASE
        assert sb._init_pidfd >= _spawn.PARK_BASE
        proc = sb.exec(["/bin/sh", "-c", "echo in"])
        assert proc.communicate() == (b"in\n", b"")
        low = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        os.close(low)
        assert low < _spawn.PARK_BASE
    finally:
        sb.destroy()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("limit", [200, 96])
def test_a_small_nofile_limit_parks_lower_or_not_at_all(limit):
    """Half the soft limit when it is below 2 * PARK_BASE; under 128 nothing moves (the
    descriptor comes back as it was), and either way it still works."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        parked = _spawn.park_fd(fd)
        if limit // 2 >= 64:
            assert limit // 2 <= parked < limit
            assert fcntl.fcntl(parked, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            with pytest.raises(OSError):
                os.fstat(fd)  # the old number was closed
        else:
            assert parked == fd
        fd = parked
        assert os.read(fd, 1) == b""
    finally:
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
