"""Egress links die with their sandbox, also when the process that made them is killed."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys

from corral.sandbox import sweep

from ..processes import alive, wait_until
from .conftest import host_links

CRASHER = r"""
import os, sys, time
from corral.sandbox import Sandbox, SandboxSpec
sb = Sandbox(SandboxSpec(allow_net=("allowed.test",)))
sb.start()
print(sb.egress.egress_ns_inode, sb.init_pid, os.stat(f"/proc/{sb.init_pid}/ns/net").st_ino,
      flush=True)
time.sleep(600)
"""


def holders(inode: int) -> list[str]:
    """Every process and descriptor on the host still referring to network namespace inode."""
    found = []
    for path in glob.glob("/proc/[0-9]*/ns/net") + glob.glob("/proc/[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(path) == f"net:[{inode}]":
                found.append(path)
    return found


def test_a_killed_creator_leaves_no_namespace_or_link(internet):
    links_before = host_links()
    proc = subprocess.Popen([sys.executable, "-c", CRASHER], stdout=subprocess.PIPE, text=True)
    try:
        egress_inode, init_pid, sandbox_inode = map(int, proc.stdout.readline().split())
        assert holders(sandbox_inode)  # PID 1 is in it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # PID 1 dies with its creator (PDEATHSIG); the kernel then frees both namespaces: no
    # process or descriptor anywhere refers to them any more.
    assert wait_until(lambda: not alive(init_pid), 10)
    assert wait_until(lambda: not holders(sandbox_inode) and not holders(egress_inode), 10)
    assert host_links() == links_before
    sweep()  # the crashed creator's runtime dir and cgroup, as the next start would
