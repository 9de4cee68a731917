"""The exit statuses of `corral`, as `corral run --help` documents them, in one place.

A command's status follows the shell: its own exit code, or 128+N when signal N killed it
(returncodes carry that as -N, as subprocess does): sandbox/exit_status.py is its one home.
"""

from __future__ import annotations

import signal as _signal

# Re-exported: the verbs and the terminal code take them from here.
from ...sandbox.exit_status import killed_by as killed_by
from ...sandbox.exit_status import shell_status as shell_status

#: A usage error: a bad flag or value, or -t without a terminal on stdin.
EXIT_USAGE = 2
#: The command ran past its timeout.
EXIT_TIMEOUT = 124
#: The sandbox could not be set up.
EXIT_SETUP_FAILED = 125
#: The command does not exist inside the sandbox.
EXIT_NOT_FOUND = 127
#: The memory limit killed the command (SIGKILL from the OOM killer: 128+9).
EXIT_OOM = 137


def exec_ending(command: str, exited) -> tuple[int, str]:
    """The status of a daemon Exec's `exited` event, and the line to print for it ("" for
    none): the daemon names a timeout or an OOM kill as its reason."""
    if exited.reason == "timeout":
        return EXIT_TIMEOUT, f"{command}: killed after its timeout"
    if exited.reason == "oom":
        return EXIT_OOM, f"{command}: killed by the memory limit (OOM)"
    return shell_status(exited.returncode), ""


def status_words(exited) -> str:
    """How an ExecExited or SessionExited reads on stderr, in the API's terms: "status 3",
    or "status 143, signal 15 (SIGTERM)" when a signal ended it."""
    words = f"status {shell_status(exited.returncode)}"
    if exited.signal:
        try:
            name = f" ({_signal.Signals(exited.signal).name})"
        except ValueError:
            name = ""
        words += f", signal {exited.signal}{name}"
    return words
