"""Exits as the API reports them: the ExitReason enum, the signal and the shell's status
beside each returncode and reason word (issue #17, "one style across the API")."""

from __future__ import annotations

from corral.sandbox.exit_status import shell_status
from corral.v1 import stream_pb2


def exit_fields(returncode: int, reason: str) -> dict:
    """The typed fields of an exit, beside its returncode (-N: signal N) and reason word:
    `exit_reason` (ExitReason: the word upper-cased, '-' as '_'; UNSPECIFIED for a word
    the enum lacks), `signal` (0: none) and `exit_status` (the shell's 128+N, as the CLI
    exits). The one place ExecExited, SessionExited and SessionInfo are filled from, so
    the API and the CLI report a signal the same way. Deep tasks pass their stored word
    ("" when no command's end decided the task: UNSPECIFIED)."""
    try:
        typed = stream_pb2.ExitReason.Value("EXIT_REASON_" + reason.upper().replace("-", "_"))
    except ValueError:
        typed = stream_pb2.EXIT_REASON_UNSPECIFIED
    return {"exit_reason": typed, "signal": max(0, -returncode),
            "exit_status": shell_status(returncode)}
