"""`corral ps` and `corral sessions`: the caller's sandboxes and sessions on the daemon, as a
table (commands and labels escaped) or JSON lines (exactly as recorded)."""

from __future__ import annotations

import argparse
import time

from corral.runtime.terminal import visible

from .connection import add_daemon_parser, connect, daemon_verb
from .output import print_json_lines, shown_labels

#: The label selector's grammar, as both listing verbs' --selector help gives it.
SELECTOR_GRAMMAR = ("requirements joined by commas, k=v, k!=v (or absent), k (present), "
                    "!k (absent); e.g. 'team=ml,!gpu'")


def add_parsers(sub) -> None:
    ps = _add_listing(
        sub, "ps", ("sandbox", "sandboxes"), ps_verb, help="list sandboxes and their commands",
        description="List sandboxes. Control and bidi characters of commands are shown "
                    "escaped (\\x1b, \\u202e); --json has them as they are.")
    ps.add_argument("--destroyed", action="store_true",
                    help="the destroyed sandboxes the daemon still remembers instead")
    sessions = _add_listing(
        sub, "sessions", ("session", "sessions"), sessions_verb, help="list sessions",
        description="List this tenant's sessions: running ones, and those whose agent exited "
                    "and that the daemon still holds (until idle for its session_idle_ttl).")
    sessions.add_argument("--state", choices=("running", "exited"),
                          help="only sessions in this state")


def _add_listing(sub, name: str, noun: tuple[str, str], handler, *, help: str,
                 description: str) -> argparse.ArgumentParser:
    """A listing verb of what `noun` (singular, plural) names: the connection flags, --json
    and -l/--selector."""
    p = add_daemon_parser(sub, name, help=help, description=description)
    p.add_argument("--json", action="store_true", help=f"one JSON object per {noun[0]}")
    p.add_argument("-l", "--selector", metavar="SELECTOR", default="",
                   help=f"only {noun[1]} whose labels match: {SELECTOR_GRAMMAR}")
    p.set_defaults(handler=handler)
    return p


def _printed_plainly(found, args, nothing: str) -> bool:
    """Print --json lines, or `nothing` when there is nothing; False when a table is due."""
    if args.json:
        print_json_lines(found)
    elif not found:
        print(nothing)
    else:
        return False
    return True


@daemon_verb
def ps_verb(args) -> int:
    from corral.v1 import sandbox_pb2

    state = sandbox_pb2.SANDBOX_STATE_DESTROYED if args.destroyed else 0
    with connect(args) as client:
        boxes = client.list_sandboxes(args.selector, state)
    if _printed_plainly(boxes, args, "no sandboxes"):
        return 0
    labelled = any(b.labels for b in boxes)
    print(f"{'SANDBOX':18} {'TENANT':10} {'AGE':>7} {'TTL LEFT':>9} {'MEMORY':>7}  COMMANDS"
          + ("  LABELS" if labelled else ""))
    now = time.time()
    for b in boxes:
        running = [e for e in b.execs if e.running]
        cmds = ", ".join(f"{e.id}:{visible(' '.join(e.argv)[:30])}" for e in running) or "-"
        print(f"{b.id:18} {b.tenant:10} {now - b.created_at:6.0f}s {b.expires_at - now:8.0f}s "
              f"{b.spec.memory_bytes >> 20:6d}M  {cmds}"
              + (f"  {shown_labels(b.labels)}" if labelled else ""))
    return 0


@daemon_verb
def sessions_verb(args) -> int:
    from corral.v1 import session_pb2

    state = {"running": session_pb2.SESSION_STATE_RUNNING,
             "exited": session_pb2.SESSION_STATE_EXITED}.get(args.state or "", 0)
    with connect(args) as client:
        found = client.list_sessions(args.selector, state)
    if _printed_plainly(found, args, "no sessions"):
        return 0
    print(f"{'SESSION':18} {'SANDBOX':18} {'STATE':8} {'AGE':>7} {'TURN':>5} {'LAST SEQ':>9}  "
          "LABELS")
    now = time.time()
    for s in found:
        state_name = "exited" if s.state == session_pb2.SESSION_STATE_EXITED else "running"
        print(f"{s.session_id:18} {s.sandbox_id:18} {state_name:8} {now - s.created_at:6.0f}s "
              f"{s.turn:5d} {s.last_seq:9d}  {shown_labels(s.labels)}")
    return 0
