"""Test agent: numbered tokens at a set rate; echoes INPUT, ends the turn on INTERRUPT.

Runs inside a sandbox (stdlib only, plus the protocol helper at /opt/corral/lib). Tokens are
"t0", "t1", ... numbered across the whole session (with --pad: "t0:xxx..."); an INPUT is
echoed as the token "in:TEXT" where it arrives. With --ledger every token is also appended to
a file (one JSON string a line, flushed at each turn end and at exit), so a test can compare
what a client received with what the agent really emitted.

Turns: the first starts at once (or at the first INPUT with --idle) and ends after --tokens
tokens ("completed") or at an INTERRUPT ("interrupted"); the agent then waits, and the next
INPUT starts the next turn. SHUTDOWN (or the control pipe's end) makes it exit 0.
"""

import argparse
import json
import sys
import time

import corral_agent as agent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=100, help="tokens per turn; 0: no end")
    parser.add_argument("--rate", type=float, default=0.0, help="tokens/s; 0: flat out")
    parser.add_argument("--idle", action="store_true", help="wait for an INPUT first")
    parser.add_argument("--exit", type=int, default=None, metavar="CODE",
                        help="exit with CODE when the first turn completes")
    parser.add_argument("--ledger", help="file to append every token to")
    parser.add_argument("--pad", type=int, default=0, metavar="BYTES",
                        help="make each numbered token this long: tN:xxxx...")
    args = parser.parse_args()

    ledger = open(args.ledger, "a", encoding="utf-8") if args.ledger else None  # noqa: SIM115
    counter = 0

    def emit(text: str) -> None:
        agent.token(text)
        if ledger is not None:
            ledger.write(json.dumps(text) + "\n")

    def end_turn(status: str) -> None:
        if ledger is not None:
            ledger.flush()
        agent.turn_end(status)

    in_turn = not args.idle
    emitted = 0
    next_at = time.monotonic()
    while True:
        if in_turn:
            timeout = max(0.0, next_at - time.monotonic()) if args.rate else 0.0
        else:
            timeout = None
        msg = agent.wait(timeout)
        if msg is not None:
            if msg.kind == "shutdown":
                break
            if msg.kind == "input":
                emit(f"in:{msg.text}")
                if not in_turn:
                    in_turn, emitted, next_at = True, 0, time.monotonic()
            elif msg.kind == "interrupt" and in_turn:
                in_turn = False
                end_turn("interrupted")
            continue
        if not in_turn:
            continue
        if args.tokens and emitted >= args.tokens:
            in_turn = False
            end_turn("completed")
            if args.exit is not None:
                break
            continue
        text = f"t{counter}"
        if args.pad > len(text):
            text = f"{text}:".ljust(args.pad, "x")
        emit(text)
        counter += 1
        emitted += 1
        if args.rate:
            next_at += 1.0 / args.rate
    if ledger is not None:
        ledger.close()
    return args.exit if args.exit is not None else 0


if __name__ == "__main__":
    sys.exit(main())
