"""The supervisor of one local deep-task attempt: `python -m corral.runtime.tasks.shim PLAN`.

The daemon starts it in its own session and does not wait for it to end: the sandbox's PID 1
dies with *this* process (PR_SET_PDEATHSIG), not with the daemon, so a daemon that is
restarted (or SIGKILLed) leaves the attempt running, and the next daemon re-attaches by
reading the attempt's runner.json and watching this process through a pidfd. SIGTERM
cancels the attempt: the sandbox is destroyed, which kills its whole process tree.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import sys

from corral.sandbox.procinfo import live_start_time

from .files import atomic_write
from .runner import AttemptPlan, AttemptRunner

#: Held (flock) for the shim's whole life: a daemon that can take it knows the shim is gone.
LOCK_NAME = "lock"


def nice_of_weight(weight: int | None) -> int:
    """The nice increment that gives a process about weight/100 of an ordinary one's CPU
    when contended (the scheduler's weights step by ~1.25x a nice level), 0..19; a weight
    of 100 or more leaves it as it is (the shim never raises its priority). The shim and
    the sandbox it starts (which inherits the value, and may not lower it) then yield to
    the daemon and to real-time sessions' agents in the same way as the task's cgroup."""
    if weight is None or weight >= 100:
        return 0
    return min(19, round(math.log(100 / weight) / math.log(1.25)))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m corral.runtime.tasks.shim PLAN.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        plan = AttemptPlan.from_json(f.read())
    os.nice(nice_of_weight(plan.sandbox.cpu_weight))
    runner = AttemptRunner(plan)
    os.makedirs(runner.dir, mode=0o700, exist_ok=True)
    lock = os.open(os.path.join(runner.dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                   0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    atomic_write(os.path.join(runner.dir, "shim.json"),
                 json.dumps({"pid": os.getpid(), "start": live_start_time(os.getpid())}).encode())
    signal.signal(signal.SIGTERM, lambda *_: runner.cancel())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    outcome = runner.run()
    return 0 if outcome["outcome"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
