"""Exit reasons as an enum (issue #17): every reason a backend gives and every session end
has its ExitReason value, and a signal reads the same through the API's fields as through
the CLI's exit status."""

from __future__ import annotations

import pytest

from corral.runtime.api.exits import exit_fields
from corral.runtime.cli.exits import EXIT_OOM, EXIT_TIMEOUT, exec_ending, status_words
from corral.sandbox.backends.base import ExitReason
from corral.v1 import sandbox_pb2, session_pb2, stream_pb2

#: The words a session's exit gives beyond a command's (runtime/sessions.py).
SESSION_ENDS = ("closed", "idle", "daemon-shutdown")


@pytest.mark.parametrize("word", [r.value for r in ExitReason] + list(SESSION_ENDS))
def test_every_reason_word_has_its_enum_value(word):
    typed = exit_fields(0, word)["exit_reason"]
    assert stream_pb2.ExitReason.Name(typed) == "EXIT_REASON_" + word.upper().replace("-", "_")


def test_a_word_the_enum_lacks_is_unspecified_and_keeps_its_word():
    exited = sandbox_pb2.ExecExited(returncode=1, reason="vanished",
                                    **exit_fields(1, "vanished"))
    assert (exited.exit_reason, exited.reason) == (stream_pb2.EXIT_REASON_UNSPECIFIED,
                                                   "vanished")


@pytest.mark.parametrize(("returncode", "reason", "signal", "status"), [
    (0, "exited", 0, 0),
    (3, "exited", 0, 3),
    (-15, "signaled", 15, 143),
    (-9, "oom", 9, 137),
    (-9, "timeout", 9, 137),
])
def test_the_api_reports_a_signal_as_the_cli_exits(returncode, reason, signal, status):
    exited = sandbox_pb2.ExecExited(returncode=returncode, reason=reason,
                                    **exit_fields(returncode, reason))
    assert (exited.signal, exited.exit_status) == (signal, status)
    cli_status, _line = exec_ending("cmd", exited)
    expected = {"timeout": EXIT_TIMEOUT, "oom": EXIT_OOM}.get(reason, exited.exit_status)
    assert cli_status == expected


def test_a_session_exit_carries_the_same_fields():
    ended = session_pb2.SessionExited(returncode=-2, reason="signaled",
                                      **exit_fields(-2, "signaled"))
    assert (ended.exit_reason, ended.signal, ended.exit_status) == (
        stream_pb2.EXIT_REASON_SIGNALED, 2, 130)
    info = session_pb2.SessionInfo(**exit_fields(0, "idle"))
    assert info.exit_reason == stream_pb2.EXIT_REASON_IDLE


def test_the_cli_words_a_signal_as_the_api_reports_it():
    killed = session_pb2.SessionExited(returncode=-15, reason="signaled",
                                       **exit_fields(-15, "signaled"))
    assert status_words(killed) == "status 143, signal 15 (SIGTERM)"
    assert status_words(session_pb2.SessionExited(returncode=3, reason="exited")) == "status 3"
