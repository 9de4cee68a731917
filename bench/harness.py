"""What the benchmarks share: a real daemon to measure, the root check, the sizes of a run
(and their --quick smoke values), and the one JSON object (or the table) each prints.

The scripts run as `python bench/NAME.py`, so this folder is first on sys.path and they
import this module as `harness`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

#: Seconds a daemon gets to create its socket before the bench gives up on it.
DAEMON_START_S = 30.0


class Size(NamedTuple):
    """How much of something one run measures: its default, and its value in a --quick
    smoke run (which checks that the bench works, in seconds, not what it measures)."""

    default: int | float
    quick: int | float
    help: str


def add_sizes(parser: argparse.ArgumentParser, sizes: dict[str, Size]) -> None:
    """A --NAME flag per size (of its default's type), and --quick, which caps each one at
    its quick value (apply_quick)."""
    for name, size in sizes.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(size.default),
                            default=size.default,
                            help=f"{size.help} (default: {size.default}; --quick: {size.quick})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every size at most its --quick value")


def apply_quick(args: argparse.Namespace, sizes: dict[str, Size]) -> None:
    """With --quick, cap each size at its quick value (a smaller one given stays)."""
    if args.quick:
        for name, size in sizes.items():
            setattr(args, name, min(getattr(args, name), size.quick))


def parse_args(description: str, sizes: dict[str, Size],
               argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of a bench whose only flags are its sizes, --quick and --json (print
    one JSON object): parsed from argv (None: sys.argv), --quick applied."""
    parser = argparse.ArgumentParser(description=description)
    add_sizes(parser, sizes)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    apply_quick(args, sizes)
    return args


def start_daemon(root: str, *flags: str, wrapper: tuple[str, ...] = ()) -> tuple[
        subprocess.Popen, str]:
    """A `corral daemon` with its socket, state and workspaces under root, started and
    listening; (the process, its socket path). Its output goes to root/daemon.log.

    Args:
        flags: more `corral daemon` flags (e.g. "--workspace-size", "16M").
        wrapper: a command the daemon runs under (e.g. prlimit ... --), which must exec it.

    Raises:
        RuntimeError: it exited or had no socket after DAEMON_START_S; the log's tail says why.
    """
    socket = os.path.join(root, "corral.sock")
    log_path = os.path.join(root, "daemon.log")
    cmd = [*wrapper, sys.executable, "-m", "corral.runtime.cli", "daemon", "--socket", socket,
           "--state", os.path.join(root, "state"), "--workspace-root", os.path.join(root, "ws"),
           *flags]
    with open(log_path, "ab") as log:  # the child keeps its own descriptor of it
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + DAEMON_START_S
    while not os.path.exists(socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            with open(log_path, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"the daemon did not start ({log_path}):\n{tail}")
        time.sleep(0.05)
    return proc, socket


def stop_daemon(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the daemon and wait for it; SIGKILL after grace_s."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def require_root(why: str) -> None:
    """Exit with status 2 and say why unless running as root."""
    if os.geteuid() != 0:
        print(f"bench/{os.path.basename(sys.argv[0])} needs root ({why})", file=sys.stderr)
        sys.exit(2)


def emit(result: dict, as_json: bool, *, sort_keys: bool = False) -> None:
    """Print the result: one JSON object, or one `key value` line per entry."""
    if as_json:
        print(json.dumps(result, sort_keys=sort_keys))
        return
    width = max((len(str(key)) for key in result), default=0) + 2
    for key in sorted(result) if sort_keys else result:
        print(f"{key:{width}} {result[key]}")
