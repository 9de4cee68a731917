"""Bench agent of the mixed run (bench/_mixed.py): delegates deep tasks when told to.

An INPUT "go K STEPS CPU" delegates K tasks of bench/agents/mixed_task.py (STEPS progress
reports 100 ms apart each, holding CPU cores each), after saying "d REF NS" for each (NS:
CLOCK_MONOTONIC just before its DELEGATE) so a watcher can time delegate -> RUNNING. It
answers each end with "done REF".
"""

import time

import corral_agent as agent


def main() -> int:
    wave = 0
    agent.turn_end("completed")
    while True:
        for handle, message in agent.news():
            if message.kind in ("done", "refused"):
                agent.token(f"done {handle.ref}\n")
        msg = agent.wait(0.02)
        if msg is None:
            continue
        if msg.kind == "shutdown":
            return 0
        if msg.kind == "input" and msg.text.startswith("go "):
            count, steps, cpu = msg.text.split()[1:4]
            wave += 1
            for i in range(int(count)):
                ref = f"w{wave}t{i}"
                agent.token(f"d {ref} {time.monotonic_ns()}\n")
                agent.delegate(
                    ["python3", "/workspace/mixed_task.py", steps], ref=ref,
                    files=["mixed_task.py"], resources={"cpu": float(cpu)})


if __name__ == "__main__":
    raise SystemExit(main())
