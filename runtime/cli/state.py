"""Sandbox state on the daemon: `corral pause`/`resume` (frozen in place), `corral snapshot`
(capture, list, inspect, remove) and the copy-on-write workspace verbs `diff`, `apply` and
`discard`."""

from __future__ import annotations

import json
import time

from .connection import add_daemon_parser, add_target_parser, connect, daemon_verb

PAUSE_DESCRIPTION = """\
Freeze every process of SANDBOX in place (the cgroup freezer): it uses no CPU until `corral resume`.
Its TTL clock stops while paused (the daemon's paused_ttl bounds a pause), and a command's time
limit does not count the pause. An exec against a paused sandbox is refused unless it asks to wait
(`corral exec --wait-if-paused`). Memory stays held: a pause is not a checkpoint."""
RESUME_DESCRIPTION = """\
Thaw a paused SANDBOX: its processes go on where they stopped. Prints the new expiry time (its TTL
moved on by the time it spent paused)."""


def add_parsers(sub) -> None:
    pause = add_target_parser(sub, "pause", help="freeze a sandbox in place (no CPU until resume)",
                              description=PAUSE_DESCRIPTION)
    pause.set_defaults(handler=pause_verb)
    resume = add_target_parser(sub, "resume", help="let a paused sandbox run again",
                               description=RESUME_DESCRIPTION)
    resume.set_defaults(handler=resume_verb)
    add_state_parsers(sub)


def _expiry(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))




SNAPSHOT_DESCRIPTION = """\
`corral snapshot SANDBOX [--name N]` captures SANDBOX's writable files (its /workspace, and its
root's changes when it runs on an image) as an immutable snapshot and prints its id; the sandbox
is frozen for the copy and runs on after it. Start new sandboxes from it with
`corral create --from SNAPSHOT` (no copy: each sees exactly that state, and its own changes only).
`corral snapshot ls` lists the tenant's snapshots, `corral snapshot inspect SNAPSHOT` shows one,
`corral snapshot rm SNAPSHOT` removes one (refused while a sandbox runs on it). Processes are not
captured: a snapshot holds files (docs/state.md)."""
DIFF_DESCRIPTION = """\
Show what SANDBOX changed in its copy-on-write workspace (`corral create --workspace DIR --cow`)
against DIR as it is now: a unified diff for text files, one line for binary, deleted and
mode-changed files. The sandbox may be running or destroyed: its changes stay until
`corral apply` or `corral discard`. A path marked CONFLICT changed on the host since the sandbox
started."""
APPLY_DESCRIPTION = """\
Write SANDBOX's copy-on-write workspace changes into its host directory, and end SANDBOX if it
still runs (the directory is its overlay's lower layer). Refused, naming the files, when a host
copy changed since the sandbox started, unless --force: a refused apply ends nothing. Files get the
directory's owner; setuid/setgid bits, device nodes and links leading out are never written."""
DISCARD_DESCRIPTION = """\
Drop SANDBOX's copy-on-write workspace changes; a running SANDBOX is destroyed first."""
_SNAPSHOT_ACTIONS = ("ls", "inspect", "rm")


def add_state_parsers(sub) -> None:
    """snapshot, diff, apply, discard."""
    snap = add_daemon_parser(
        sub, "snapshot", help="capture a sandbox's files; list, inspect, remove snapshots",
        usage="corral snapshot SANDBOX [--name N] | ls | inspect SNAPSHOT | rm SNAPSHOT",
        description=SNAPSHOT_DESCRIPTION)
    snap.add_argument("words", nargs="+", metavar="SANDBOX | ls | inspect SNAPSHOT | rm SNAPSHOT")
    snap.add_argument("--name", default="", help="a name for the new snapshot (per tenant)")
    snap.add_argument("--json", action="store_true", help="print JSON")
    snap.set_defaults(handler=snapshot_verb)
    diff = add_target_parser(sub, "diff", help="what a copy-on-write workspace changed",
                             description=DIFF_DESCRIPTION)
    add_diff_flags(diff)
    diff.set_defaults(handler=diff_verb)
    apply = add_target_parser(sub, "apply", help="write a copy-on-write workspace's changes "
                                                 "into its host directory",
                              description=APPLY_DESCRIPTION)
    apply.add_argument("--force", action="store_true",
                       help="overwrite host files that changed since the sandbox started")
    apply.set_defaults(handler=apply_verb)
    discard = add_target_parser(sub, "discard", help="drop a copy-on-write workspace's changes",
                                description=DISCARD_DESCRIPTION)
    discard.set_defaults(handler=discard_verb)


def add_diff_flags(p) -> None:
    """--stat and --json, the output flags diff_verb reads (`corral diff`, `corral task diff`)."""
    p.add_argument("--stat", action="store_true", help="one line per file: +added -removed")
    p.add_argument("--json", action="store_true", help="one JSON object per changed path")


def _snapshot_fields(s) -> dict:
    return {"id": s.id, "name": s.name, "source_sandbox": s.source_sandbox, "parent": s.parent,
            "image": s.image, "created_at": s.created_at, "size_bytes": s.size_bytes,
            "files": s.files, "in_use": s.in_use, "root_digest": s.root_digest,
            "workspace_digest": s.workspace_digest}


@daemon_verb
def snapshot_verb(args) -> int:
    from .connection import usage_error

    action, rest = args.words[0], args.words[1:]
    wanted = {"ls": 0, "inspect": 1, "rm": 1}.get(action, 0)
    if len(rest) != wanted:
        raise usage_error("snapshot: usage: corral snapshot SANDBOX [--name N] | ls | "
                          "inspect SNAPSHOT | rm SNAPSHOT")
    with connect(args) as client:
        if action == "ls":
            found = client.list_snapshots()
            if args.json:
                print(json.dumps([_snapshot_fields(s) for s in found], indent=2))
            else:
                print(f"{'ID':<18} {'NAME':<20} {'FROM':<18} {'SIZE':>10} {'FILES':>7} IN USE")
                for s in found:
                    print(f"{s.id:<18} {s.name or '-':<20} {s.source_sandbox:<18} "
                          f"{s.size_bytes:>10} {s.files:>7} {s.in_use}")
            return 0
        if action == "rm":
            client.remove_snapshot(rest[0])
            print(f"{rest[0]} removed")
            return 0
        made = (client.get_snapshot(rest[0]) if action == "inspect"
                else client.snapshot(action, args.name))
    if args.json or action == "inspect":
        print(json.dumps(_snapshot_fields(made), indent=2))
    else:
        print(made.id)
    return 0


_KIND_NAMES = {1: "added", 2: "modified", 3: "deleted", 4: "mode"}


@daemon_verb
def diff_verb(args) -> int:
    from corral.runtime.terminal import visible

    with connect(args) as client:
        changes = list(client.diff(args.sandbox_id, patch=not (args.stat or args.json)))
    if args.json:
        for c in changes:
            print(json.dumps({"path": c.path, "kind": _KIND_NAMES.get(c.kind, "?"),
                              "type": c.type, "old_mode": c.old_mode, "new_mode": c.new_mode,
                              "size": c.size, "binary": c.binary, "conflict": c.conflict,
                              "lines_added": c.lines_added,
                              "lines_removed": c.lines_removed}))
        return 0
    for c in changes:
        path = visible(c.path)
        mark = "  CONFLICT" if c.conflict else ""
        if args.stat:
            counts = "binary" if c.binary else f"+{c.lines_added} -{c.lines_removed}"
            print(f"{_KIND_NAMES.get(c.kind, '?'):<8} {path} | {counts}{mark}")
        elif c.patch:  # line by line: the sandbox wrote it, no escape reaches the terminal
            for line in c.patch.splitlines():
                print(visible(line))
            if mark:
                print(f"# {path}:{mark}")
        else:
            modes = f" {c.old_mode:o} -> {c.new_mode:o}" if c.kind == 4 else ""
            what = " (binary)" if c.binary else ""
            print(f"{_KIND_NAMES.get(c.kind, '?')}: {path}{what}{modes}{mark}")
    if args.stat:
        print(f"{len(changes)} paths changed, +{sum(c.lines_added for c in changes)} "
              f"-{sum(c.lines_removed for c in changes)} lines")
    return 0


def _one_call(call, report):
    """A verb that makes one call about args.sandbox_id and prints one line of its answer."""

    @daemon_verb
    def verb(args) -> int:
        with connect(args) as client:
            answer = call(client, args)
        print(report(args, answer))
        return 0

    return verb


pause_verb = _one_call(lambda client, args: client.pause(args.sandbox_id),
                       lambda args, _: f"{args.sandbox_id} paused")
resume_verb = _one_call(lambda client, args: client.resume(args.sandbox_id),
                        lambda args, sb: f"{args.sandbox_id} running, expires "
                                         f"{_expiry(sb.expires_at)}")
apply_verb = _one_call(lambda client, args: client.apply(args.sandbox_id, force=args.force),
                       lambda args, done: f"{len(done.written)} written, "
                                          f"{len(done.removed)} removed")
discard_verb = _one_call(lambda client, args: client.discard(args.sandbox_id),
                         lambda args, count: f"{count} changed paths discarded")
