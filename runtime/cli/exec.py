"""`corral exec`: a command in a daemon sandbox, its stdout and stderr streamed byte for byte;
with -t on a terminal (corral.runtime.interactive)."""

from __future__ import annotations

import os
import sys

from .connection import add_target_parser, connect, daemon_verb
from .exits import EXIT_USAGE, exec_ending
from .flags import add_command, add_env_flag, add_terminal_flags, command_argv, parse_env
from .output import fail

EXEC_DESCRIPTION = """\
Streams the command's stdout and stderr byte for byte (binary output arrives as written: `corral
exec SB -- cat blob | sha256sum`). Nothing is dropped: while this reader is slow the daemon
stops reading the command's output, and the command waits in write(2). The exit status is the
command's own. -t runs it on a terminal, -it with your keys and your terminal raw: as `corral
run -it` (see `corral run --help`), through the daemon (Exec with tty; window changes are sent
as Resize)."""


def add_parsers(sub) -> None:
    exe = add_target_parser(
        sub, "exec", help="run a command in a daemon sandbox, streaming its output",
        usage="corral exec [OPTIONS] SANDBOX -- CMD [ARGS...]",
        description=EXEC_DESCRIPTION)
    exe.add_argument("--timeout", metavar="DURATION")
    add_env_flag(exe)
    add_terminal_flags(exe)
    exe.add_argument("--allow-loss", action="store_true",
                     help="never hold the command back: output this reader is too slow for "
                          "is dropped; a loss is reported on stderr and the exit status is "
                          "then non-zero (the command's own, or 1 when it exited 0)")
    exe.add_argument("--wait-if-paused", action="store_true",
                     help="on a paused sandbox, wait until it is resumed (default: refuse)")
    exe.add_argument("-u", "--user", metavar="USER[:GROUP]", default="",
                     help="run as this user of the sandbox's /etc (a name or a number; "
                          "default: the image's User, else root inside)")
    add_command(exe)
    exe.set_defaults(handler=exec_verb)


@daemon_verb
def exec_verb(args) -> int:
    argv = command_argv(args)
    if not argv:
        return fail("exec: no command given; usage: corral exec SANDBOX -- CMD [ARGS...]",
                    EXIT_USAGE)
    kw = {"env": parse_env(args.env)}
    if args.allow_loss:
        kw["allow_loss"] = True
    if args.wait_if_paused:
        kw["wait_if_paused"] = True
    if args.user:
        kw["user"] = args.user
    if args.timeout:
        from corral.sandbox.spec import parse_duration

        kw["timeout_s"] = parse_duration(args.timeout, "timeout")
    if args.tty:
        if not os.isatty(0):
            return fail("exec: -t needs a terminal on stdin (it is a pipe or a file); drop "
                        "-t to send stdin to the command", EXIT_USAGE)
        from corral.runtime import interactive

        with connect(args) as client:
            return interactive.exec_on_terminal(client, args.sandbox_id, argv, kw,
                                                interactive=args.interactive, raw=args.raw)
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        if data:
            kw["stdin"] = data
    from corral.runtime.terminal import TerminalWriter

    sinks = {1: TerminalWriter(sys.stdout.buffer, raw=args.raw),
             2: TerminalWriter(sys.stderr.buffer, raw=args.raw)}
    try:
        return _exec_stream(args, argv, kw, sinks)
    finally:
        for sink in sinks.values():
            sink.close()


def _exec_stream(args, argv, kw, sinks) -> int:
    lost = {1: 0, 2: 0}  # entries (reads of the command's pipe) dropped, per stream
    with connect(args) as client:
        for event in client.exec(args.sandbox_id, argv, **kw):
            kind = event.WhichOneof("event")
            if kind == "output":
                batch = event.output.batch
                if batch.HasField("lost"):
                    lost[event.output.stream] += batch.lost.count
                sinks[event.output.stream].write(batch.text)
            elif kind == "exited":
                status, message = exec_ending(argv[0], event.exited)
                if message:
                    fail(message)
                return _report_loss(argv, lost, status)
    return fail("exec: the stream ended without an exit status")


def _report_loss(argv, lost: dict[int, int], status: int) -> int:
    """One stderr line when output was dropped (only --allow-loss allows it); the status is
    then non-zero: the command's own, or 1 when it exited 0."""
    if not any(lost.values()):
        return status
    parts = [f"{n} chunks of {name}" for name, n in (("stdout", lost[1]), ("stderr", lost[2]))
             if n]
    fail(f"exec: {' and '.join(parts)} of {argv[0]} were lost (this reader was too slow; "
         f"the command exited with status {status})")
    return status or 1
