"""A pair agent: answers the user at full speed while a deep task works on a GPU node.

    corral session --put examples/agents/pair_agent.py --put examples/agents/deep_task.py \\
        -- python3 pair_agent.py

Each line the user types is answered at once, streamed token by token. A line that asks to
"run" something is also handed to the runtime as a deep task (protocol v1.1 DELEGATE):
deep_task.py, copied from this session's workspace, on a node labelled accelerator=gpu. The
task checkpoints and survives retries; meanwhile the conversation goes on, and every answer
starts with where the task is, in the agent's own words. Once the task is done, the next
answer folds its result in (the result files are in /workspace/.corral/tasks/ID/).
"""

from __future__ import annotations

import json
import os
import sys
import time

try:
    import corral_agent as agent  # mounted in every Corral sandbox
except ImportError:  # run by hand outside Corral
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "ext"))
    import agent  # type: ignore[no-redef]

#: What the deep task runs: the checkpointing example, long enough to chat alongside.
TASK_ARGV = ["python3", "/workspace/deep_task.py", "--steps", "120", "--step-seconds", "0.05"]


class Pair:
    """The conversation and the one deep task it may have running."""

    def __init__(self) -> None:
        self.task: agent.Delegation | None = None
        self.state = "none"  # the task as last heard: accepted, RUNNING, SUCCEEDED, ...
        self.percent = 0
        self.node = ""
        self.result: dict | None = None
        self.told_result = False

    def follow(self) -> None:
        """Take in whatever the runtime said about the task since the last look."""
        for _, message in agent.news():
            fields = message.fields
            if message.kind == "refused":
                self.state = f"refused ({fields.get('message', '')})"
            elif message.kind == "accepted":
                self.state = "accepted"
            else:
                self.state = fields.get("state", self.state)
                self.node = fields.get("node") or self.node
                progress = fields.get("progress") or {}
                if progress.get("total"):
                    self.percent = round(100 * progress["done"] / progress["total"])
                if message.kind == "done":
                    self.result = fields

    def status_words(self) -> str:
        """Where the task is, said the way a colleague would."""
        if self.task is None:
            return ""
        if self.result is not None and not self.told_result:
            self.told_result = True
            answer = (self.result.get("result") or {}).get("answer")
            if self.result.get("state") == "SUCCEEDED":
                return (f"Good news: the simulation finished on {self.node or 'the GPU node'}; "
                        f"the sum came out at {answer} (files in {self.result['out_dir']}). ")
            return f"The simulation ended {self.result.get('state', '').lower()}. "
        if self.result is not None:
            return ""
        if self.state == "RUNNING":
            return f"(The simulation is about {self.percent}% through on {self.node}.) "
        return f"(The simulation is {self.state.lower()}, waiting for a GPU node.) "

    def answer(self, question: str) -> None:
        """Stream one answer, task status first; a "run" request starts the deep task."""
        self.follow()
        words = self.status_words()
        if "run" in question.lower() and self.task is None:
            self.task = agent.delegate(TASK_ARGV, selector={"accelerator": "gpu"},
                                       files=["deep_task.py"], max_runtime_s=600)
            words += ("I've handed the simulation to a GPU node as a deep task; it "
                      "checkpoints as it goes. Ask me anything meanwhile. ")
        elif self.result is not None:
            words += "What shall we look at next?"
        else:
            words += f"You asked {question!r}: here is a quick answer while it runs. "
        for word in words.split(" "):
            if word:
                agent.token(word + " ")
        agent.turn_end("completed")


def main() -> int:
    pair = Pair()
    agent.turn_end("completed")  # nothing to say before the user speaks
    while True:
        message = agent.wait(0.1)
        pair.follow()
        if message is None:
            continue
        if message.kind == "shutdown":
            return 0
        if message.kind == "input":
            pair.answer(message.text)
        elif message.kind == "task":  # a task of an earlier agent of this session
            agent.log("news of an earlier delegation: " + json.dumps(json.loads(message.text)))
        time.sleep(0)


if __name__ == "__main__":
    raise SystemExit(main())
