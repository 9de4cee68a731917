"""The shell's 128+N convention for a command that a signal ended, in one place.

A shell reports a command that signal N killed as status 128+N; Python's returncodes carry
it as -N (as subprocess does), and Docker reports the shell's form. Standard library only,
so the command line can share it with the backends.
"""

from __future__ import annotations

#: Statuses above this are 128+N for signal N (the shell's convention).
_SIGNALED_BASE = 128
#: Signals are 1..64 on Linux: a status of 128+65 or more is a plain exit code.
_MAX_SIGNAL = 64


def killed_by(signum: int) -> int:
    """The status of a process that signal `signum` ended: 128+N."""
    return _SIGNALED_BASE + signum


def shell_status(returncode: int) -> int:
    """The shell's status of a returncode: the exit code, or 128+N for -N (killed by N)."""
    return returncode if returncode >= 0 else killed_by(-returncode)


def signal_of(status: int) -> int | None:
    """The signal N a shell status of 128+N names, or None for a plain exit code."""
    signum = status - _SIGNALED_BASE
    return signum if 0 < signum <= _MAX_SIGNAL else None
