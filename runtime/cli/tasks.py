"""`corral task ...` and `corral nodes ...`: deep tasks and nodes on a running daemon."""

from __future__ import annotations

import json
import sys
import time

from corral.runtime.terminal import visible

from .connection import add_daemon_parser, add_target_parser, connect, daemon_verb
from .exits import EXIT_USAGE
from .flags import (
    add_command,
    add_env_flag,
    add_from_flag,
    add_host_workspace_flags,
    add_label_flags,
    add_put_flag,
    add_secret_flag,
    command_argv,
    parse_labels,
    parse_secrets,
)
from .output import print_json_lines
from .state import add_diff_flags, apply_verb, diff_verb, discard_verb

STATE_NAMES = ("", "QUEUED", "PLACED", "RUNNING", "RETRYING", "SUCCEEDED", "FAILED",
               "CANCELLED", "PULLING")


RECOVER_DESCRIPTION = """\
Offline: set a damaged tasks.db aside (renamed, never deleted), copy every row that can still be
read into a new one, and record each task known from its directory or the audit log but not
restored as lost (quarantine table, task.store_recovered audit record)."""
WATCH_DESCRIPTION = """\
Follow a task. On a terminal only text, newlines, tabs and colours of its log are shown: other
escape sequences, control characters and bidi overrides are dropped (--raw: all of it); a pipe
gets every byte."""


def add_parsers(sub) -> None:
    task = sub.add_parser("task", help="submit and follow deep tasks",
                          description="Deep tasks: durable, placed on labelled nodes, resumed "
                                      "from their last checkpoint after a failure.")
    task.set_defaults(handler=task_verb)
    verbs = task.add_subparsers(dest="task_verb", metavar="VERB")
    _add_submit(verbs)
    _add_followers(verbs)
    recover = verbs.add_parser(
        "recover", help="rebuild a damaged or missing tasks.db (daemon stopped)",
        description=RECOVER_DESCRIPTION)
    recover.add_argument("--state", required=True, metavar="DIR",
                         help="the daemon's state directory (its --state)")

    nodes = add_daemon_parser(sub, "nodes", help="list nodes; cordon, uncordon or drain one",
                              usage="corral nodes [ls | get NAME | cordon NAME | uncordon NAME "
                                    "| drain NAME]")
    nodes.add_argument("--json", action="store_true", help="one JSON object per node")
    nodes.add_argument("nodes_verb", nargs="?", default="ls",
                       choices=("ls", "get", "cordon", "uncordon", "drain"))
    nodes.add_argument("name", nargs="?", metavar="NAME")
    nodes.set_defaults(handler=nodes_verb)


def _add_submit(verbs) -> None:
    submit = add_daemon_parser(
        verbs, "submit", help="submit a task; prints its id",
        usage="corral task submit [OPTIONS] -- CMD [ARGS...]",
        description="Submit CMD as a deep task. The id is printed once the daemon has "
                    "committed the task to disk.")
    submit.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE",
                        help="node label the task needs (repeatable; all must match)")
    submit.add_argument("--resources", action="append", default=[], metavar="NAME=N",
                        help="countable resource it holds, e.g. cpu=2 or accelerator.h200=1 "
                             "(repeatable)")
    submit.add_argument("--priority", type=int, default=0, metavar="N",
                        help="0-1000, higher runs first (default: 0)")
    submit.add_argument("--retries", type=int, default=0, metavar="N",
                        help="attempts after a failed one, each from the last checkpoint")
    submit.add_argument("--max-runtime", metavar="DURATION",
                        help="wall-clock limit of one attempt, e.g. 30m or 2h")
    submit.add_argument("--memory", metavar="SIZE", help="memory limit of its sandbox")
    submit.add_argument("--image", metavar="REF",
                        help="run its sandbox on this image (docs/images.md), pulled by the "
                             "node that runs it (the task is PULLING meanwhile)")
    add_put_flag(submit, "the task's /workspace")
    add_env_flag(submit)
    add_secret_flag(submit, "the daemon's secret store (for your tenant), read again at each "
                            "attempt")
    add_host_workspace_flags(submit, "copy-on-write: DIR is not touched; every attempt sees "
                                     "the changes of those before it; see `corral task "
                                     "diff|apply|discard`", needs_cow=True)
    add_from_flag(submit, "each attempt starts from this snapshot (id or name): its files, no "
                          "copy; held while the task lives")
    add_label_flags(submit, "task", "task ls",
                    "idempotency key: submitting again with the same ID (a retry) prints the "
                    "task the first submission made, not a new one")
    add_command(submit)


def _add_followers(verbs) -> None:
    """The verbs about one task or the list of them: get, ls, watch, cancel, result."""
    get = add_target_parser(verbs, "get", help="show one task", dest="task_id", metavar="ID")
    get.add_argument("--json", action="store_true", help="print the task as JSON")

    ls = add_daemon_parser(verbs, "ls", help="list tasks, newest first")
    ls.add_argument("--state", choices=[s.lower() for s in STATE_NAMES[1:]])
    ls.add_argument("--json", action="store_true", help="one JSON object per task")
    ls.add_argument("-l", "--selector", default="", metavar="SELECTOR",
                    help="only tasks whose labels (--label at submit; not node labels) "
                         "match: k=v, k!=v, k, !k joined by commas")
    ls.add_argument("--session", default="", metavar="SESSION",
                    help="only the tasks that session delegated (or was linked to)")

    watch = add_target_parser(
        verbs, "watch", help="follow a task: live progress bar and its log",
        description=WATCH_DESCRIPTION, dest="task_id", metavar="ID")
    watch.add_argument("--raw", action="store_true",
                       help="write the log to a terminal unchanged")

    add_target_parser(verbs, "cancel", help="cancel a task (kills its whole process tree)",
                      dest="task_id", metavar="ID")

    result = add_target_parser(verbs, "result", help="print a finished task's RESULT and "
                                                     "save its /workspace/out files",
                               dest="task_id", metavar="ID")
    result.add_argument("--out", metavar="DIR", help="write the output files under DIR")
    _add_changes(verbs)


def _add_changes(verbs) -> None:
    """diff, apply, discard of a copy-on-write task (submit --workspace DIR --cow): the
    Sandboxes calls of `corral diff|apply|discard`, by task id (a task's change set is
    named after it, and outlives its attempts)."""
    diff = add_target_parser(verbs, "diff", help="what a copy-on-write task changed in its "
                                                 "workspace so far", metavar="ID")
    add_diff_flags(diff)
    apply = add_target_parser(verbs, "apply", help="write a finished copy-on-write task's "
                                                   "changes into its directory", metavar="ID")
    apply.add_argument("--force", action="store_true",
                       help="write even over files changed on the host since the task began")
    add_target_parser(verbs, "discard", help="drop a finished copy-on-write task's changes",
                      metavar="ID")


@daemon_verb
def task_verb(args) -> int:
    if args.task_verb is None:
        print("corral: task: which verb? (submit, get, ls, watch, cancel, result, diff, "
              "apply, discard)", file=sys.stderr)
        return EXIT_USAGE
    return {"submit": _submit, "get": _get, "ls": _ls, "watch": _watch,
            "cancel": _cancel, "result": _result, "recover": _recover, "diff": diff_verb,
            "apply": apply_verb, "discard": discard_verb}[args.task_verb](args)


def _recover(args) -> int:
    import os

    from corral.runtime.audit import AuditLog
    from corral.runtime.tasks.recover import check_offline, recover
    from corral.sandbox.errors import CorralError

    audit_path = os.path.join(args.state, "audit.db")
    try:
        check_offline(args.state)
        audit = AuditLog.open(audit_path) if os.path.exists(audit_path) else None
        try:
            print(recover(args.state, audit).summary())
        finally:
            if audit is not None:
                audit.close()
    except CorralError as exc:
        print(f"corral: task recover: {exc}", file=sys.stderr)
        return 1
    return 0


def _submit(args) -> int:
    import os

    from corral.runtime.tasks.model import parse_pairs
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import parse_duration, parse_size

    argv = command_argv(args)
    if not argv:
        print("corral: task submit: no command; usage: corral task submit [OPTIONS] -- CMD",
              file=sys.stderr)
        return EXIT_USAGE
    selector = parse_pairs(args.selector, "selector")
    resources = {}
    for name, amount in parse_pairs(args.resources, "resources").items():
        try:
            resources[name] = float(amount)
        except ValueError:
            raise InvalidSpec(f"resources[{name}]", f"{amount!r} is not a number") from None
    files = {}
    for item in args.put:
        local, sep, inside = item.partition(":")
        with open(local, "rb") as f:
            files[inside if sep else os.path.basename(local)] = f.read()
    sandbox = {}
    if args.memory:
        sandbox["memory_bytes"] = parse_size(args.memory, "memory")
    if args.env:
        sandbox["env"] = parse_pairs(args.env, "env")
    if args.image:  # the sandbox's image field: the daemon makes it the task's (spec.image)
        sandbox["image"] = args.image
    if args.secret:
        sandbox["secrets"] = [{"name": b.name, "hosts": list(b.hosts)}
                              for b in (b.checked() for b in parse_secrets(args.secret))]
    if args.from_snapshot:
        sandbox["snapshot"] = args.from_snapshot
    if args.workspace or args.cow:
        if not (args.workspace and args.cow):
            print("corral: task submit: a task takes a host directory copy-on-write only: "
                  "--workspace DIR --cow", file=sys.stderr)
            return EXIT_USAGE
        sandbox["workspace_dir"] = os.path.abspath(args.workspace)
        sandbox["workspace_cow"] = True
    labels = parse_labels(args.label)  # "=v" is refused here, as by corral create
    with connect(args) as client:
        task = client.submit_task(
            argv, selector=selector, resources=resources, priority=args.priority,
            retries=args.retries, files=files, request_id=args.request_id, labels=labels,
            max_runtime_s=parse_duration(args.max_runtime, "max-runtime")
            if args.max_runtime else 0.0, **sandbox)
    print(task.id)
    return 0


def task_dict(task) -> dict:
    from google.protobuf import json_format

    d = json_format.MessageToDict(task, preserving_proto_field_name=True)
    d["state"] = STATE_NAMES[task.state]
    d.get("spec", {}).pop("files", None)
    return d


def _get(args) -> int:
    with connect(args) as client:
        task = client.get_task(args.task_id)
    if args.json:
        print(json.dumps(task_dict(task), indent=2, sort_keys=True))
        return 0
    # what the task wrote (reason, progress, result, argv) is shown escaped: \x1b, \u202e
    print(f"id:         {task.id}\nstate:      {STATE_NAMES[task.state]}  "
          f"({visible(task.reason)})\n"
          f"tenant:     {task.tenant}\nnode:       {task.node or '-'}\n"
          f"attempt:    {task.attempt}\ncheckpoint: {task.checkpoint_seq or '-'}\n"
          f"progress:   {visible(task.progress_json) or '-'}\n"
          f"parent:     {task.parent_session or '-'}\n"
          f"command:    {visible(' '.join(task.spec.argv))}")
    if task.result_json:
        print(f"result:     {visible(task.result_json)}")
    return 0


def _ls(args) -> int:
    state = STATE_NAMES.index(args.state.upper()) if args.state else 0
    with connect(args) as client:
        tasks = client.list_tasks(state=state, selector=args.selector,
                                  parent_session=args.session or "")
    if args.json:
        for t in tasks:
            print(json.dumps(task_dict(t), sort_keys=True))
        return 0
    print(f"{'ID':22} {'STATE':10} {'TENANT':10} {'NODE':12} {'TRY':>3} {'PRIO':>4}  COMMAND")
    for t in tasks:
        print(f"{t.id:22} {STATE_NAMES[t.state]:10} {t.tenant:10} {t.node or '-':12} "
              f"{t.attempt:>3} {t.spec.priority:>4}  {visible(' '.join(t.spec.argv)[:60])}")
    return 0


def progress_line(task, width: int = 30) -> str:
    """'[#####.....]  50% 5/10 RUNNING' from the task's last PROGRESS (done/total)."""
    try:
        p = json.loads(task.progress_json) if task.progress_json else {}
    except ValueError:
        p = {}
    done, total = p.get("done"), p.get("total")
    state = STATE_NAMES[task.state]
    if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
        frac = max(0.0, min(1.0, done / total))
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        return f"[{bar}] {frac * 100:5.1f}% {done:g}/{total:g} {state} (attempt {task.attempt})"
    msg = p.get("message", "")
    return f"{state} (attempt {task.attempt}) {visible(str(msg))}".rstrip()


def _watch(args) -> int:
    from corral.runtime.terminal import TerminalWriter

    out = TerminalWriter(sys.stdout.buffer, raw=args.raw)
    try:
        return _watch_updates(args, out)
    finally:
        out.close()


def _watch_updates(args, out) -> int:
    tty = sys.stderr.isatty()
    last = None
    with connect(args) as client:
        for update in client.watch_task(args.task_id):
            if update.HasField("log"):
                if tty and last:
                    sys.stderr.write("\r\033[K")
                    sys.stderr.flush()
                out.write(update.log.text)
                if tty and last:
                    sys.stderr.write(last)
                continue
            task = update.task
            line = progress_line(task)
            if line != last:
                sys.stderr.write(("\r\033[K" + line) if tty else line + "\n")
                sys.stderr.flush()
                last = line
    if tty:
        sys.stderr.write("\n")
    print(f"{task.id}: {STATE_NAMES[task.state]} ({visible(task.reason)})", file=sys.stderr)
    return 0 if STATE_NAMES[task.state] == "SUCCEEDED" else 1


def _cancel(args) -> int:
    with connect(args) as client:
        task = client.cancel_task(args.task_id)
        end = time.monotonic() + 30
        while task.state in (2, 3, 8) and time.monotonic() < end:  # PLACED, RUNNING, PULLING
            time.sleep(0.2)
            task = client.get_task(args.task_id)
    print(f"{task.id}: {STATE_NAMES[task.state]}")
    return 0


def _result(args) -> int:
    """Print the RESULT and every output file's size; with --out, write the files there.

    Files come page by page (each answer within the message limit) and a file may come in
    pieces: each piece is written at its offset and the file is then extended to its size,
    so a big file never sits in memory and a sparse one stays sparse.
    """
    import os

    current: dict = {"path": None, "fd": -1, "size": 0}

    def finish_file() -> None:
        if current["fd"] >= 0:
            os.ftruncate(current["fd"], current["size"])
            os.close(current["fd"])
        if current["path"] is not None:
            print(f"{visible(current['path'])}\t{current['size']} bytes", file=sys.stderr)
        current.update(path=None, fd=-1, size=0)

    state = None
    try:
        with connect(args) as client:
            for page in client.task_result_pages(args.task_id):
                if state is None:
                    state = page.task.state
                    print(visible(page.result_json) or "{}")
                for f in page.files:
                    if f.path != current["path"]:
                        finish_file()
                        current.update(path=f.path, size=f.size)
                        if args.out:
                            current["fd"] = _open_output(args.out, f.path)
                    if current["fd"] >= 0 and f.content:
                        os.pwrite(current["fd"], f.content, f.offset)
    finally:
        finish_file()
    return 0 if STATE_NAMES[state] == "SUCCEEDED" else 1


def _open_output(out_dir: str, rel: str) -> int:
    """A fresh file out_dir/rel for writing, or -1 when rel would leave out_dir."""
    import os

    path = os.path.join(out_dir, os.path.normpath(rel))
    if os.path.isabs(os.path.normpath(rel)) or os.path.relpath(path, out_dir).startswith(".."):
        return -1
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o644)


@daemon_verb
def nodes_verb(args) -> int:
    verb = args.nodes_verb
    if verb != "ls" and not args.name:
        print(f"corral: nodes {verb}: which node?", file=sys.stderr)
        return EXIT_USAGE
    with connect(args) as client:
        if verb == "ls":
            nodes = client.list_nodes()
        elif verb == "get":
            nodes = [client.get_node(args.name)]
        elif verb == "drain":
            nodes = [client.drain_node(args.name)]
        else:
            nodes = [client.cordon_node(args.name, verb == "cordon")]
    if args.json:
        print_json_lines(nodes, proto_names=True, sort_keys=True)
        return 0
    print(f"{'NODE':14} {'EXEC':5} {'STATUS':10} {'TASKS':>5}  LABELS / FREE of CAPACITY")
    for n in nodes:
        status = ("lost" if n.lost else "draining" if n.draining else
                  "cordoned" if n.cordoned else "ready")
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        res = " ".join(f"{k}={_num(n.free.get(k, 0))}/{_num(v)}"
                       for k, v in sorted(n.capacity.items()))
        print(f"{n.name:14} {n.executor:5} {status:10} {len(n.tasks):>5}  {labels}  {res}")
    return 0


def _num(v: float) -> str:
    if v >= 1 << 30 and v % (1 << 20) == 0:
        return f"{v / (1 << 30):.0f}G"
    return f"{v:g}"
