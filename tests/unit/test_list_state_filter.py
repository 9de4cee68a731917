"""check_state: the one check of a List request's state filter (Sandboxes, Sessions, Tasks)."""

from __future__ import annotations

import pytest

from corral.runtime.labels import check_state
from corral.runtime.tasks.states import TaskState
from corral.sandbox.errors import InvalidSpec
from corral.v1 import sandbox_pb2, session_pb2


@pytest.mark.parametrize("state", [0, *sandbox_pb2.SandboxState.values()])
def test_a_known_state_or_zero_passes_unchanged(state):
    assert check_state(state, sandbox_pb2.SandboxState.values(), "SandboxState") == state


def test_zero_means_any_even_where_zero_is_not_listed():
    assert check_state(0, set(TaskState), "TaskState value") == 0


@pytest.mark.parametrize(("known", "name"), [
    (sandbox_pb2.SandboxState.values(), "SandboxState"),
    (session_pb2.SessionState.values(), "SessionState"),
    (set(TaskState), "TaskState value"),
])
def test_an_unknown_state_names_the_field_and_the_enum(known, name):
    with pytest.raises(InvalidSpec, match=rf"^state: 189 is not a {name}$"):
        check_state(189, known, name)
