"""Example agent: streams a made-up answer token by token, steerable mid-turn.

Run it in a sandbox:   corral run --ro examples:/examples -- python3 /examples/token_agent.py
Inside every sandbox `corral_agent` (the protocol helper) is importable. Under the daemon the
tokens travel as protocol frames; run by hand (or by `corral run`) they go to stdout.
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
    for i in range(args.tokens):
        control = agent.poll()
        if control is not None and control.kind in ("interrupt", "shutdown"):
            agent.token("\n[interrupted]\n")
            agent.turn_end("interrupted")
            return 0
        if control is not None and control.kind == "input":
            agent.token(f"\n[steered: {control.text}]\n")
        agent.token(WORDS[i % len(WORDS)] + " ")
        if connected:
            agent.progress(done=i + 1, total=args.tokens)
        time.sleep(1.0 / args.rate)
    agent.turn_end("completed")
    agent.result(tokens=args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
