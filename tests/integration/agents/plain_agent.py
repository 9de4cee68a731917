"""Test agent that knows nothing of the protocol: lines on stdout, stdin echoed, an exit code.

Prints "line 0" .. "line N-1" on stdout and one line on stderr; with --echo it then prints
"echo: LINE" for each stdin line until "quit" or end of input. Exits with --exit CODE.
"""

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=3)
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--exit", type=int, default=0, metavar="CODE")
    args = parser.parse_args()
    for i in range(args.lines):
        print(f"line {i}", flush=True)
    print("plain agent on stderr", file=sys.stderr, flush=True)
    if args.echo:
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line == "quit":
                break
            print(f"echo: {line}", flush=True)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
