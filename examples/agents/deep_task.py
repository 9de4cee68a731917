"""A deep task: a long computation that reports progress, checkpoints, and resumes.

    corral task submit --retries 2 -- python3 /workspace/deep_task.py --steps 600

It sums i*i for i in [0, steps) one step at a time (--step-seconds each, standing in for real
work). Every --checkpoint-every steps it hands the runtime a CHECKPOINT frame (its position
and running sum) and also writes the same state to $CORRAL_CHECKPOINT_DIR/state.json; both are
persisted by the daemon. When it starts again after a crash, a lost node or a daemon restart,
it resumes from the newest of the two instead of from zero. At the end it writes
/workspace/out/answer.txt and a RESULT frame with the answer and where it resumed from.

--crash-at STEP makes the first attempt exit with status 3 at that step (to see a retry).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import corral_agent as agent  # mounted in every Corral sandbox
except ImportError:  # run by hand outside Corral
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "ext"))
    import agent  # type: ignore[no-redef]


def restore() -> dict:
    """The newest saved state: the last CHECKPOINT frame or the checkpoint directory's file."""
    best = {"step": 0, "acc": 0}
    frame_path = os.environ.get("CORRAL_CHECKPOINT_FILE")
    if frame_path and os.path.exists(frame_path):
        with open(frame_path, "rb") as f:
            best = max(best, json.loads(f.read()), key=lambda s: s["step"])
    ckpt_dir = os.environ.get("CORRAL_CHECKPOINT_DIR")
    if ckpt_dir and os.path.exists(os.path.join(ckpt_dir, "state.json")):
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            best = max(best, json.load(f), key=lambda s: s["step"])
    return best


def save(state: dict) -> None:
    data = json.dumps(state).encode()
    ckpt_dir = os.environ.get("CORRAL_CHECKPOINT_DIR")
    if ckpt_dir:
        os.makedirs(ckpt_dir, exist_ok=True)
        tmp = os.path.join(ckpt_dir, "state.json.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(ckpt_dir, "state.json"))
    agent.checkpoint(data)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--step-seconds", type=float, default=0.05)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--crash-at", type=int, default=-1)
    args = p.parse_args()

    state = restore()
    resumed_from = state["step"]
    attempt = int(os.environ.get("CORRAL_ATTEMPT", "1"))
    agent.log(f"attempt {attempt}: starting at step {resumed_from} of {args.steps}")
    for i in range(state["step"], args.steps):
        if attempt == 1 and i == args.crash_at:
            agent.log(f"crashing at step {i} as asked")
            return 3
        time.sleep(args.step_seconds)
        state = {"step": i + 1, "acc": state["acc"] + i * i}
        agent.progress(done=i + 1, total=args.steps, attempt=attempt, resumed_from=resumed_from)
        if (i + 1) % args.checkpoint_every == 0:
            save(state)
    os.makedirs("/workspace/out", exist_ok=True)
    with open("/workspace/out/answer.txt", "w") as f:
        f.write(f"{state['acc']}\n")
    agent.result(answer=state["acc"], steps=args.steps, resumed_from=resumed_from,
                 attempt=attempt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
