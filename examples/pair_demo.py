"""`make run`, second half: two modes in one loop. A session chats while its deep task runs.

Starts a daemon with one node labelled accelerator=gpu (a local node standing in for a GPU
machine), runs examples/agents/pair_agent.py in a session, and plays the user: asks for a
simulation (the agent delegates it as a deep task), keeps asking questions while it runs,
and sees the result folded into an answer. Task news prints inline, as `corral session`
shows it. The daemon lives under a temporary directory (examples/demo.py's with_daemon).
"""

import json
import os
import sys
import time

from demo import HERE, with_daemon

from corral.runtime.cli.session import task_line
from corral.runtime.client import Client, decode_batch

CONFIG = """\
[[nodes]]
name = "gpu-1"
labels = { accelerator = "gpu" }
resources = { cpu = 2, memory = "2G" }
"""
QUESTIONS = ["Hi! Can you run the long simulation for me?",
             "While that runs: what is a checkpoint?",
             "And how do retries work?",
             "Anything else I should know?"]
LAST_QUESTION = "So, how did the simulation go?"


def main() -> int:
    return with_daemon(converse, CONFIG)


def converse(sock: str) -> int:
    """Ask the questions one turn at a time, a second apart; once the task is done, ask
    how it went; then close. Task progress prints at each quarter."""
    with Client.connect(socket=sock) as client:
        sandbox = client.create_sandbox(memory_bytes=256 << 20)
        for name in ("pair_agent.py", "deep_task.py"):
            with open(os.path.join(HERE, "agents", name), "rb") as f:
                client.write_file(sandbox.id, name, f.read())
        stream = client.open_session(["python3", "pair_agent.py"], sandbox_id=sandbox.id)
        pending = [*QUESTIONS, LAST_QUESTION]
        quarters: set[int] = set()
        finished = waiting = False
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "batch":
                sys.stdout.write("".join(decode_batch(event.batch).texts))
                sys.stdout.flush()
            elif kind == "task":
                quarter = _quarter(event.task)
                if event.task.event != "update" or quarter not in quarters:
                    quarters.add(quarter)
                    print(f"\n{task_line(event.task)}")
                finished = finished or event.task.event == "done"
            elif kind == "turn_ended":
                waiting = True
            elif kind == "exited":
                print(f"\n[agent exited: {event.exited.reason}]")
            if waiting and (pending[0:1] != [LAST_QUESTION] or finished):
                waiting = False
                if not pending:
                    stream.close_session()
                    continue
                time.sleep(0 if len(pending) > len(QUESTIONS) else 1.0)
                print(f"\n> {pending[0]}")
                stream.send_input(pending.pop(0))
        client.destroy_sandbox(sandbox.id)
    return 0


def _quarter(task) -> int:
    """Which quarter of the work a RUNNING update says is done (-1 for other states)."""
    if task.state != "RUNNING" or not task.progress_json:
        return -1
    progress = json.loads(task.progress_json)
    return int(4 * progress.get("done", 0) / max(progress.get("total", 1), 1))


if __name__ == "__main__":
    raise SystemExit(main())
