"""Example agent: streams a made-up answer token by token, steerable mid-turn.

    corral run --ro examples/agents:/agents -- python3 /agents/stream_agent.py
    corral session --put examples/agents/stream_agent.py -- python3 stream_agent.py

Inside every sandbox `corral_agent` (the protocol helper) is importable. Under the daemon the
tokens travel as protocol frames: an INPUT is woven into the running turn, an INTERRUPT ends
it ("interrupted") and the agent then waits for the next input, SHUTDOWN ends it. Run by
hand (or by `corral run`) the tokens go to stdout.
"""

import argparse
import os
import platform
import time

import corral_agent as agent

WORDS = (
    "Corral runs this agent inside a Linux sandbox: its own user, PID, mount, network, "
    "UTS, IPC and cgroup namespaces, a read-only view of the host system, no capabilities, "
    "a seccomp filter and Landlock rules. Each word you read was produced inside it and "
    "streamed out as it was written."
).split(" ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=len(WORDS), help="how many tokens to emit")
    parser.add_argument("--rate", type=float, default=200.0, help="tokens per second")
    args = parser.parse_args()

    # Run by hand, progress would interleave with the text on the terminal: report it only
    # to a runtime that is listening.
    connected = agent.default_agent().connected
    agent.log(f"token_agent on {platform.node()} (pid {os.getpid()}): {args.tokens} tokens")
    turn = 0
    while True:
        turn += 1
        status = stream_turn(args, connected)
        if status == "shutdown" or not connected:
            break
        agent.turn_end(status)
        # between turns: wait for the next input (or the end)
        control = agent.wait()
        if control is None or control.kind == "shutdown":
            break
        if control.kind == "input":
            agent.token(f"\n[turn {turn + 1}: {control.text}]\n")
    if not connected:
        agent.turn_end("completed")
    agent.result(tokens=args.tokens, turns=turn)
    return 0


def stream_turn(args, connected: bool) -> str:
    """Emit one answer; returns how the turn ended."""
    for i in range(args.tokens):
        control = agent.poll()
        if control is not None and control.kind == "shutdown":
            return "shutdown"
        if control is not None and control.kind == "interrupt":
            agent.token("\n[interrupted]\n")
            return "interrupted"
        if control is not None and control.kind == "input":
            agent.token(f"\n[steered: {control.text}]\n")
        agent.token(WORDS[i % len(WORDS)] + " ")
        if connected:
            agent.progress(done=i + 1, total=args.tokens)
        time.sleep(1.0 / args.rate)
    return "completed"


if __name__ == "__main__":
    raise SystemExit(main())
