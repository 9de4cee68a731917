"""`corral image pull|push|ls|inspect|rm|prune`: the local image store, without a daemon.

Each verb prints plain text, or one JSON document with --json. Pull shows a progress bar
per layer (bytes of its blob) on stderr when stderr is a terminal, and otherwise prints one
line per layer as each is done (present, or unpacked, with its size).
"""

from __future__ import annotations

import json
import sys
import time

from .exits import EXIT_USAGE

HELP = "import images into the local store, list, inspect and remove them"
DESCRIPTION = """\
Images come from an OCI image layout (oci:DIR[:TAG]), a 'docker save' tarball
(docker-archive:FILE), a registry (docker://HOST/REPO[:TAG|@DIGEST], or HOST/REPO[:TAG]
when no local engine holds that name; credentials as docker keeps them in
$DOCKER_CONFIG/config.json) or, by name, a local Docker engine (DOCKER_HOST, through
'docker save'). Each layer is verified (sha256 of the blob and of the unpacked tar) and
unpacked once, shared by every image that has it. See docs/images.md."""


def add_parsers(sub) -> None:
    image = sub.add_parser("image", help=HELP, description=DESCRIPTION)
    image.set_defaults(handler=image_verb)
    verbs = image.add_subparsers(dest="image_verb", metavar="VERB")

    def verb(name: str, help_: str):
        p = verbs.add_parser(name, help=help_)
        p.add_argument("--store", metavar="DIR",
                       help="the store's directory (default: $CORRAL_IMAGE_ROOT, else "
                            "/var/lib/corral/images for root, "
                            "$XDG_STATE_HOME/corral/images for a user)")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        return p

    verb("pull", "import REF into the store").add_argument("ref", metavar="REF")
    push = verb("push", "send the image SRC (any REF form) to the registry image DEST")
    push.add_argument("src", metavar="SRC")
    push.add_argument("dest", metavar="DEST", help="HOST[:PORT]/REPO[:TAG]")
    verb("ls", "list the images in the store")
    verb("inspect", "show an image's record, config and layer directories").add_argument(
        "ref", metavar="REF")
    verb("rm", "remove images (and the layers no other image uses)").add_argument(
        "refs", metavar="REF", nargs="+")
    verb("prune", "remove layers no image uses and leftovers of interrupted pulls")


def image_verb(args) -> int:
    from corral.sandbox.errors import CorralError
    from corral.sandbox.images import ImageStore

    if not args.image_verb:
        print("corral image: name a verb: pull, ls, inspect, rm or prune", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = ImageStore(args.store)
        return _VERBS[args.image_verb](store, args)
    except CorralError as exc:
        print(f"corral image {args.image_verb}: {exc}", file=sys.stderr)
        return _exit_status(exc)
    except OSError as exc:
        print(f"corral image {args.image_verb}: {exc}", file=sys.stderr)
        return 1


def _pull(store, args) -> int:
    if not args.json and sys.stderr.isatty():
        record = _pull_with_bars(store, args.ref)
    else:
        def progress(event) -> None:
            if args.json:
                return
            line = (f"layer {event.index}/{event.count} {event.diff_id[:19]} {event.state} "
                    f"({human(event.bytes)})")
            print(line, file=sys.stderr, flush=True)

        record = store.pull(args.ref, progress=progress)
    if args.json:
        print(json.dumps(record.to_json(), indent=1))
    else:
        print(f"{record.ref} {record.id[:19]} {human(record.size)}")
    return 0


def _pull_with_bars(store, ref: str):
    """store.pull with a rich bar per layer: bytes of its blob as they are read, then
    'unpacked' or 'present'."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bars: dict[int, object] = {}

    def bar(index: int, count: int, total: int | None):
        if index not in bars:
            bars[index] = progress.add_task(f"layer {index}/{count}", total=total)
        return bars[index]

    def on_bytes(event) -> None:
        progress.update(bar(event.index, event.count, event.total), completed=event.done)

    def on_layer(event) -> None:
        task = bar(event.index, event.count, None)
        done = progress.tasks[task].completed  # a present layer read no bytes: a full bar
        progress.update(task, total=done or 1, completed=done or 1,
                        description=f"layer {event.index}/{event.count} "
                                    f"{event.diff_id[7:19]} {event.state}")

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=Console(stderr=True)) as progress:
        return store.pull(ref, progress=on_layer, on_bytes=on_bytes)


def _push(store, args) -> int:
    from corral.sandbox.images.sources import push_image

    digest = push_image(args.src, args.dest, scratch=store.root + "/tmp")
    if args.json:
        print(json.dumps({"src": args.src, "dest": args.dest, "digest": digest}))
    else:
        print(f"{args.dest} {digest}")
    return 0


def _ls(store, args) -> int:
    records = store.images()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=1))
        return 0
    rows = [("REF", "ID", "LAYERS", "SIZE", "PULLED")]
    for r in records:
        rows.append((r.ref, r.id[7:19], str(len(r.layers)), human(r.size),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(r.pulled_at))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _inspect(store, args) -> int:
    record = store.get(args.ref)
    rootfs = store.rootfs(record.ref)
    doc = {**record.to_json(), "layer_dirs": list(rootfs.layers), "config": rootfs.config}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    cfg = rootfs.config.get("config") or {}
    rows = [("ref", record.ref), ("id", record.id), ("manifest", record.manifest_digest),
            ("size", human(record.size)),
            ("platform", f"{rootfs.config.get('os', '?')}/"
                         f"{rootfs.config.get('architecture', '?')}")]
    rows += [(key, json.dumps(cfg[key])) for key in
             ("Entrypoint", "Cmd", "WorkingDir", "User", "Env") if cfg.get(key)]
    for key, value in rows:
        print(f"{key + ':':<12}{value}")
    print("layers:")
    for layer, path in zip(record.layers, rootfs.layers, strict=True):
        print(f"  {layer.diff_id}  {path}")
    return 0


def _exit_status(exc) -> int:
    """2 for what the user can correct (a bad reference or layer, a source or media type
    not handled yet), 1 for the rest."""
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.images.errors import UnsupportedImage

    return EXIT_USAGE if isinstance(exc, InvalidSpec | UnsupportedImage) else 1


def _rm(store, args) -> int:
    from corral.sandbox.errors import CorralError

    results, code = [], 0
    for ref in args.refs:
        try:
            freed = store.remove(ref)
        except CorralError as exc:
            print(f"corral image rm: {exc}", file=sys.stderr)
            code = _exit_status(exc)
            continue
        results.append(freed)
        if not args.json:
            print(f"removed {freed.images[0]}: {len(freed.layers)} layers, "
                  f"{human(freed.bytes)} freed{_in_use(freed)}")
    if args.json:
        print(json.dumps([_freed(f) for f in results], indent=1))
    return code


def _prune(store, args) -> int:
    freed = store.prune()
    if args.json:
        print(json.dumps(_freed(freed), indent=1))
    else:
        print(f"removed {len(freed.layers)} layers, {freed.blobs} blobs, "
              f"{freed.temp_dirs} leftovers: {human(freed.bytes)} freed{_in_use(freed)}")
    return 0


def _in_use(freed) -> str:
    n = len(freed.in_use)
    return f"; {n} unused layer{'s' * (n != 1)} kept: a sandbox runs on it" if n else ""


def _freed(freed) -> dict:
    return {"images": freed.images, "layers": freed.layers, "blobs": freed.blobs,
            "temp_dirs": freed.temp_dirs, "bytes_freed": freed.bytes, "in_use": freed.in_use}


def human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


_VERBS = {"pull": _pull, "push": _push, "ls": _ls, "inspect": _inspect, "rm": _rm, "prune": _prune}
