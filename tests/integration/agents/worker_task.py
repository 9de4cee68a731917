"""Test deep task for delegation: counts steps, reports progress, can be steered.

    python3 worker_task.py STEPS STEP_SECONDS

Each step sends PROGRESS {"done": i, "total": STEPS} and checkpoints its position. An INPUT
"finish" ends it at once; any other INPUT is remembered. At the end it writes
/workspace/out/answer.txt and the RESULT {"steps": n, "inputs": [...]}.
"""

import json
import os
import sys
import time

import corral_agent as agent


def main() -> int:
    steps, pause = int(sys.argv[1]), float(sys.argv[2])
    start = 0
    frame = os.environ.get("CORRAL_CHECKPOINT_FILE")
    if frame and os.path.exists(frame):
        with open(frame, "rb") as f:
            start = json.loads(f.read())["step"]
    inputs: list[str] = []
    done = start
    while done < steps:
        msg = agent.poll()
        if msg is not None and msg.kind == "input":
            inputs.append(msg.text)
            if msg.text == "finish":
                break
        done += 1
        agent.progress(done=done, total=steps)
        agent.checkpoint(json.dumps({"step": done}).encode())
        time.sleep(pause)
    os.makedirs("/workspace/out", exist_ok=True)
    with open("/workspace/out/answer.txt", "w") as f:
        f.write(f"{done} steps\n")
    agent.result(steps=done, inputs=inputs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
