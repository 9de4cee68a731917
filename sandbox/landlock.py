"""Landlock: probe the kernel's ABI in the parent and plan the filesystem rules.

The child (ext/_spawn.pyx) builds the ruleset from this plan after pivot_root, because
rules attach to inodes that must exist in the sandbox's own view (/workspace, /tmp).
Only access rights the running ABI knows are handled (FIELD-NOTES: probe first).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

_SYS_landlock_create_ruleset = 444
_CREATE_RULESET_VERSION = 1 << 0

# Filesystem access rights and the ABI that introduced each.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

_ABI1_ALL = (1 << 13) - 1
_ALL_BY_ABI = {1: _ABI1_ALL, 2: _ABI1_ALL | REFER, 3: _ABI1_ALL | REFER | TRUNCATE}
_ALL_BY_ABI[4] = _ALL_BY_ABI[3]
for _abi in (5, 6, 7, 8, 9):
    _ALL_BY_ABI[_abi] = _ALL_BY_ABI[3] | IOCTL_DEV

READ = EXECUTE | READ_FILE | READ_DIR
#: Where the default policy lets a sandbox write (everything else is read-only).
WRITABLE_TREES = ("/workspace", "/tmp", "/dev/shm")
#: Device files that may be written and ioctl'd (terminals, the bit bucket).
WRITABLE_DEVICES = ("/dev/null", "/dev/tty", "/dev/pts")


@functools.cache
def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable or disabled."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(
        _SYS_landlock_create_ruleset, None, ctypes.c_size_t(0),
        ctypes.c_uint32(_CREATE_RULESET_VERSION),
    )
    return max(int(version), 0)


@dataclass(frozen=True)
class LandlockPlan:
    """The ruleset the child enforces: handled rights and (path, allowed rights) rules."""

    abi: int
    handled: int
    rules: tuple[tuple[str, int], ...]

    @property
    def enabled(self) -> bool:
        return self.handled != 0


def prepare(extra_writable: tuple[str, ...] = (), extra_readable: tuple[str, ...] = (),
            abi: int | None = None, devices: tuple[str, ...] = ()) -> LandlockPlan:
    """Plan the default rules: read/execute everywhere, write only in the writable trees.

    Args:
        extra_writable: further sandbox paths the spec makes writable (--rw binds).
        extra_readable: unused by the default (everything is readable), kept for profiles
            that narrow reads.
        abi: override the probed ABI (tests plan for older kernels with it).
        devices: further device nodes (sandbox paths) opened read-write, like /dev/null.
    """
    abi = abi_version() if abi is None else abi
    if abi <= 0:
        return LandlockPlan(0, 0, ())
    handled = _ALL_BY_ABI.get(abi, _ALL_BY_ABI[max(_ALL_BY_ABI)])
    write_tree = handled & ~(MAKE_CHAR | MAKE_BLOCK)
    device_rw = handled & (READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV)
    rules: list[tuple[str, int]] = [("/", READ)]
    rules += [(path, write_tree) for path in (*WRITABLE_TREES, *extra_writable)]
    rules += [(path, device_rw) for path in (*WRITABLE_DEVICES, *devices)]
    rules += [(path, READ) for path in extra_readable]
    return LandlockPlan(abi, handled, tuple(rules))
