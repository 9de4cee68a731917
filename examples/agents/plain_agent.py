"""Example plain agent: knows nothing of the protocol, just prints and reads stdin.

In a session its stdout becomes the token stream, its stderr log lines, and each input
arrives on stdin as a line; an interrupt is SIGINT.
"""

import signal
import sys
import time


def main() -> int:
    interrupted = False

    def on_sigint(_signum, _frame):
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_sigint)
    print("plain agent ready; send me lines", flush=True)
    for line in sys.stdin:
        if interrupted:
            print("[interrupted]", flush=True)
            interrupted = False
        for word in line.split():
            print(word.upper(), end=" ", flush=True)
            time.sleep(0.01)
        print(flush=True)
    print("stdin closed; bye", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
