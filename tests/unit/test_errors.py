"""The error tree: each class maps to one gRPC status, named once, through its branch."""

from __future__ import annotations

import pytest

from corral.sandbox.errors import (
    ControlClosed,
    ControlQueueFull,
    CorralError,
    Ended,
    FailedPrecondition,
    InvalidTransition,
    NotFinished,
    ResourceExhausted,
    UnsupportedHost,
    as_exhaustion,
)


@pytest.mark.parametrize("cls", [Ended, NotFinished, ControlClosed, UnsupportedHost])
def test_state_errors_are_failed_preconditions(cls):
    error = cls("what the caller sees")
    assert isinstance(error, FailedPrecondition) and isinstance(error, CorralError)
    assert (error.grpc_status, str(error)) == ("FAILED_PRECONDITION", "what the caller sees")


def test_an_illegal_transition_names_both_states():
    error = InvalidTransition("EXITED", "RUNNING")
    assert (error.grpc_status, error.from_, error.to) == ("FAILED_PRECONDITION", "EXITED",
                                                          "RUNNING")
    assert str(error) == "illegal transition EXITED -> RUNNING"


def test_a_full_control_queue_is_resource_exhaustion_in_its_own_words():
    error = ControlQueueFull(queued=4096, limit=4096, size=17)
    assert isinstance(error, ResourceExhausted)
    assert (error.grpc_status, error.queued, error.limit, error.size) == (
        "RESOURCE_EXHAUSTED", 4096, 4096, 17)
    assert str(error) == ("the agent is not reading its control pipe: 4096 bytes of control "
                          "frames are already queued (limit 4096); refused a frame of 17 bytes")
    assert as_exhaustion(error) is None  # already says what ran out
