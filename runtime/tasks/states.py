"""The deep-task lifecycle: states and the one table of legal moves between them.

Rules this module keeps:

* Every state change goes through ``check(from_, to)``; a move missing from ``TRANSITIONS``
  raises ``InvalidTransition(from_, to)``. Nothing else decides what is legal.
* QUEUED and RETRYING are *waiting* states (the scheduler places them); PLACED and RUNNING
  are *active* (they hold a node's resources); SUCCEEDED, FAILED and CANCELLED are
  *terminal* (nothing leaves them).
* RETRYING means "failed or lost, will run again from its last checkpoint"; the attempt
  counter grows when a retry is *placed*, so an attempt that never started costs nothing.
* PLACED -> QUEUED undoes a placement whose attempt never started (a drained node, a daemon
  that restarted between placing and launching).
* PULLING is active too: placed, and its node pulls the task's image before the sandbox
  starts (PLACED -> PULLING -> RUNNING). It ends like PLACED when the pull fails (RETRYING
  or FAILED) or the placement is undone (QUEUED).
"""

from __future__ import annotations

import enum

from corral.sandbox.errors import InvalidTransition


class TaskState(enum.IntEnum):
    """Equal to corral.v1.TaskState."""

    QUEUED = 1
    PLACED = 2
    RUNNING = 3
    RETRYING = 4
    SUCCEEDED = 5
    FAILED = 6
    CANCELLED = 7
    PULLING = 8


Q, P, R, RT = TaskState.QUEUED, TaskState.PLACED, TaskState.RUNNING, TaskState.RETRYING
OK, FAIL, CAN = TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED
PULL = TaskState.PULLING

#: from -> the states it may move to.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    Q: frozenset({P, CAN}),
    P: frozenset({PULL, R, Q, RT, FAIL, CAN}),
    PULL: frozenset({R, Q, RT, FAIL, CAN}),
    R: frozenset({OK, FAIL, CAN, RT}),
    RT: frozenset({P, CAN, FAIL}),
    OK: frozenset(),
    FAIL: frozenset(),
    CAN: frozenset(),
}

WAITING = frozenset({Q, RT})
ACTIVE = frozenset({P, PULL, R})
TERMINAL = frozenset({OK, FAIL, CAN})


def check(from_: TaskState, to: TaskState) -> TaskState:
    """Return `to` when from_ -> to is legal.

    Raises:
        InvalidTransition: the table has no such move.
    """
    if to not in TRANSITIONS[from_]:
        raise InvalidTransition(from_.name, to.name)
    return to
