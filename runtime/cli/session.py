"""`corral session`: start or attach to an agent session on the daemon; its tokens print live,
stdin lines steer it, Ctrl-C interrupts a turn and a second one detaches."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from corral.runtime.terminal import visible

from .connection import add_daemon_parser, connect, daemon_verb
from .exits import EXIT_USAGE, shell_status, status_words
from .flags import (
    RAW_HELP,
    add_command,
    add_flag_for,
    add_label_flags,
    add_put_flag,
    command_argv,
    parse_labels,
)
from .output import fail

SESSION_DESCRIPTION = """\
Prints the agent's tokens live. Lines typed on stdin steer the running turn; Ctrl-C interrupts
the turn, a second Ctrl-C detaches (the session keeps running; `corral session --attach ID`
comes back). End of stdin only ends steering: the tokens keep printing until the agent exits, so
`echo QUESTION | corral session -- AGENT` works in scripts. On a terminal only text, newlines,
tabs and colours of the agent's output are shown (--raw: all of it)."""


def add_parsers(sub) -> None:
    session = add_daemon_parser(
        sub, "session", help="start (or attach to) an interactive agent session",
        usage="corral session [OPTIONS] [--attach ID] [-- CMD [ARGS...]]",
        description=SESSION_DESCRIPTION,
    )
    session.add_argument("--attach", metavar="SESSION", help="attach to a running session")
    add_flag_for(session, "--attach", "--after-seq", type=int, default=0, metavar="SEQ",
                 help="replay entries after this sequence number")
    add_flag_for(session, "--attach", "--watch", action="store_true", help="watch only")
    session.add_argument("--raw", action="store_true", help=RAW_HELP)
    session.add_argument("--input", metavar="TEXT", help="first input of the session")
    session.add_argument("--delegations-from", default="", metavar="SESSION",
                         help="take over the deep tasks a gone session delegated (e.g. after "
                              "a daemon restart): their news and results come to this one")
    add_label_flags(session, "session", "sessions",
                    "idempotency key: the same start again with this ID attaches to the "
                    "session the first one started")
    session.add_argument("--sandbox", metavar="SB",
                         help="run the agent in this existing sandbox (kept after the session) "
                              "instead of a new one")
    add_flag_for(session, "--sandbox", "--wait-if-paused", action="store_true",
                 help="if it is paused, wait for its resume instead of failing")
    session.add_argument("--memory", metavar="SIZE", help="memory limit of the new sandbox")
    add_put_flag(session, "the new sandbox's /workspace first")
    add_command(session)
    session.set_defaults(handler=session_verb)


@daemon_verb
def session_verb(args) -> int:
    """Print tokens live; stdin lines steer; Ctrl-C interrupts, a second one detaches."""
    from corral.runtime.client import ClientError

    argv = command_argv(args)
    cleanup: list = []
    with connect(args) as client:
        try:
            return _session(args, argv, client, cleanup)
        finally:
            for fn in cleanup:
                with contextlib.suppress(ClientError):
                    fn()


def _upload_pair(item: str) -> tuple[str, str]:
    from corral.sandbox.errors import InvalidSpec

    local, sep, remote = item.partition(":")
    if not os.path.isfile(local):
        raise InvalidSpec("put", f"{local!r} is not a file")
    return local, remote if sep else os.path.basename(local)


def _session(args, argv, client, cleanup) -> int:
    if args.attach:
        stream = client.resume_session(args.attach, args.after_seq, args.watch)
    elif not argv:
        return fail("session: no command given; usage: corral session -- CMD", EXIT_USAGE)
    else:
        stream = _start(args, argv, client, cleanup)
    return _follow(args, stream)


def _start(args, argv, client, cleanup):
    """Open a new session: in a sandbox of its own, or, with --put, in one made first to
    receive the files (destroyed by `cleanup` when the verb ends), or in --sandbox."""
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import parse_size

    spec = {}
    if args.memory:
        spec["memory_bytes"] = parse_size(args.memory, "memory")
    uploads = [_upload_pair(item) for item in args.put]
    once = {"labels": parse_labels(args.label), "request_id": args.request_id,
            "delegations_from": args.delegations_from}
    if args.sandbox:
        if uploads or spec:
            raise InvalidSpec("--sandbox", "--put and --memory make a new sandbox; with "
                                           "--sandbox the agent runs in that one")
        return client.open_session(argv, sandbox_id=args.sandbox, input=args.input or "",
                                   wait_if_paused=args.wait_if_paused, **once)
    if args.wait_if_paused:
        raise InvalidSpec("--wait-if-paused", "only with --sandbox (a new sandbox is never "
                                              "paused)")
    if not uploads:
        return client.open_session(argv, input=args.input or "", **once, **spec)
    sandbox = client.create_sandbox(**spec)
    cleanup.append(lambda: client.destroy_sandbox(sandbox.id))
    for local, remote in uploads:
        with open(local, "rb") as f:
            client.write_file(sandbox.id, remote, f.read(),
                              0o755 if os.access(local, os.X_OK) else 0o644)
    return client.open_session(argv, sandbox_id=sandbox.id, input=args.input or "", **once)


def _follow(args, stream) -> int:
    """Print the stream's tokens and news until the agent exits (its status) or this
    client detaches (0)."""
    from corral.runtime.client import decode_batch
    from corral.runtime.terminal import TerminalWriter

    interrupts = []

    def on_sigint(_signum, _frame):
        interrupts.append(time.monotonic())
        if len(interrupts) == 1 and not args.watch:
            stream.interrupt()
        else:
            print(f"\ncorral: detached; `corral session --attach {stream.session_id} "
                  f"--after-seq {stream.last_seq}` comes back", file=sys.stderr)
            stream.detach()

    old = signal.signal(signal.SIGINT, on_sigint)
    if not args.watch:
        threading.Thread(target=_pump_lines, args=(stream,), daemon=True).start()
    tokens = 0
    started = time.monotonic()
    out = TerminalWriter(sys.stdout.buffer, raw=args.raw)
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "opened":
                print(f"corral: session {event.opened.session_id} in sandbox "
                      f"{event.opened.sandbox_id}", file=sys.stderr)
            elif kind == "batch":
                decoded = decode_batch(event.batch)
                tokens += len(decoded.texts)
                if decoded.lost:
                    print(f"\n[corral: {decoded.lost} entries were lost while this "
                          "client was behind]", file=sys.stderr)
                out.write("".join(decoded.texts).encode())
            elif kind == "task":
                print(f"\n{task_line(event.task)}", file=sys.stderr)
            elif kind == "turn_ended":
                interrupts.clear()
                print(f"\n[turn {event.turn_ended.turn} {visible(event.turn_ended.status)}]",
                      file=sys.stderr)
            elif kind == "exited":
                rate = tokens / max(time.monotonic() - started, 1e-9)
                print(f"corral: agent exited ({event.exited.reason}, "
                      f"{status_words(event.exited)}); {tokens} tokens, {rate:,.0f} tokens/s",
                      file=sys.stderr)
                return shell_status(event.exited.returncode)
    finally:
        out.close()
        signal.signal(signal.SIGINT, old)
    return 0


def task_line(ev) -> str:
    """One delegated task's news as `corral session` prints it inline, e.g.
    `[task task-3f2... RUNNING on gpu-1: 40%]` (what the agent or task wrote is escaped)."""
    import json

    name = visible(ev.task_id or ev.ref)
    if ev.event == "refused":
        return f"[task {name} refused: {ev.code} {visible(ev.message)}]"
    if ev.event == "accepted":
        return f"[task {name} accepted as {visible(ev.ref)}]"
    where = f" on {visible(ev.node)}" if ev.node else ""
    if ev.event == "done":
        extra = f": result in {visible(ev.out_dir)}" if ev.out_dir else ""
        return f"[task {name} {ev.state}{where}{extra}]"
    try:
        progress = json.loads(ev.progress_json) if ev.progress_json else {}
    except ValueError:
        progress = {}
    done, total = (progress.get("done"), progress.get("total")) if isinstance(
        progress, dict) else (None, None)
    if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
        return f"[task {name} {ev.state}{where}: {100 * done / total:.0f}%]"
    message = progress.get("message") if isinstance(progress, dict) else None
    return f"[task {name} {ev.state}{where}{': ' + visible(message) if message else ''}]"


def _pump_lines(stream) -> None:
    try:
        for line in sys.stdin:
            stream.send_input(line.rstrip("\n"))
    except (OSError, ValueError):
        pass
