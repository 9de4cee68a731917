"""The supervisor of one local deep-task attempt: `python -m corral.runtime.tasks.shim PLAN`.

The daemon starts it in its own session and does not wait for it to end: the sandbox's PID 1
dies with *this* process (PR_SET_PDEATHSIG), not with the daemon, so a daemon that is
restarted (or SIGKILLed) leaves the attempt running, and the next daemon re-attaches by
reading the attempt's runner.json and watching this process through a pidfd. SIGTERM
cancels the attempt: the sandbox is destroyed, which kills its whole process tree.

While the attempt's agent runs, the shim relays from the daemon's relays' cgroup rather than
the batch group (shim_cgroup.py: `Moves`).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys

from corral.sandbox.procinfo import live_start_time

from .files import replace_live
from .runner import AttemptPlan, AttemptRunner
from .shim_cgroup import Moves

#: Held (flock) for the shim's whole life: a daemon that can take it knows the shim is gone.
LOCK_NAME = "lock"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m corral.runtime.tasks.shim PLAN.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        plan = AttemptPlan.from_json(f.read())
    runner = AttemptRunner(plan, on_phase=Moves(plan.relay_cgroup, plan.home_cgroup).enter)
    os.makedirs(runner.dir, mode=0o700, exist_ok=True)
    lock = os.open(os.path.join(runner.dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                   0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    replace_live(os.path.join(runner.dir, "shim.json"),
                 json.dumps({"pid": os.getpid(), "start": live_start_time(os.getpid())}).encode())
    signal.signal(signal.SIGTERM, lambda *_: runner.cancel())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    outcome = runner.run()
    return 0 if outcome["outcome"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
