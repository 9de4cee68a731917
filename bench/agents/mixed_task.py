"""Deep task of the mixed run (bench/_mixed.py): STEPS progress reports, 100 ms apart, each
stamped with CLOCK_MONOTONIC ns ("t") so the session's watcher can time its delivery."""

import sys
import time

import corral_agent as agent


def main() -> int:
    steps = int(sys.argv[1])
    for i in range(1, steps + 1):
        time.sleep(0.1)
        agent.progress(done=i, total=steps, t=time.monotonic_ns())
    agent.result(steps=steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
