"""flock_held: a lock file's holder is alive exactly while its flock cannot be taken."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from corral.sandbox.locks import flock_held

# holds an exclusive flock on argv[1], says so on stdout, and keeps it until stdin closes
_HOLDER = ("import fcntl, os, sys\n"
           "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
           "fcntl.flock(fd, fcntl.LOCK_EX)\n"
           "print('held', flush=True)\n"
           "sys.stdin.read()\n")


def test_an_absent_file_has_no_holder(tmp_path):
    assert flock_held(str(tmp_path / "absent.lock")) is False


def test_a_lock_file_nobody_holds_is_free_and_stays_free(tmp_path):
    path = tmp_path / "free.lock"
    path.write_bytes(b"")
    assert flock_held(str(path)) is False
    # the probe released what it took: another description takes the lock at once
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_live_holder_is_seen_and_its_death_frees_the_lock(tmp_path):
    path = tmp_path / "shim.lock"
    path.write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert flock_held(str(path)) is True
    finally:
        holder.stdin.close()  # it reads EOF and exits; the kernel drops its lock
        assert holder.wait(30) == 0
        holder.stdout.close()
    assert flock_held(str(path)) is False
