"""`corral cp`: copy files and directories between the host and a sandbox, as `docker cp`.

One side is `SANDBOX:PATH` (a path in the sandbox, relative to /workspace or absolute under
it), the other a local path or `-`. A file moves with Upload/Download (chunked, sparse,
sha256 checked on both ends); a directory, or `-`, as a tar stream (PutArchive/GetArchive).
Local extraction keeps the daemon's rules (sandbox/archive.py): nothing lands outside the
destination, no device or setuid file is made.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from typing import TYPE_CHECKING

from .connection import add_daemon_parser, connect, daemon_verb, usage_error
from .output import fail

if TYPE_CHECKING:
    from corral.runtime.client import Client

HELP = "copy files or directories between the host and a sandbox (as docker cp)"
DESCRIPTION = """\
Copy SRC to DEST; one of them is SANDBOX:PATH (PATH relative to /workspace, or absolute
under it). As with docker cp: a file copied onto an existing directory goes into it under its
own name; a directory copied to a path that does not exist becomes that path; copied to an
existing directory it goes into it, unless SRC ends in '/.', whose contents are copied.
'-' as SRC reads a tar stream from stdin and extracts it into the sandbox directory DEST;
'-' as DEST writes SRC as a tar stream to stdout. Files of any size stream in chunks (holes
stay holes) and are checked end to end with sha256. Extraction refuses entries that would
land outside the destination (absolute names, '..', symlinks pointing out) and never makes
device nodes or setuid/setgid files."""

_REMOTE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*):(.*)$", re.S)
#: Caps of a local extraction (a sandbox's are its workspace's).
_LOCAL_CAP = 1 << 62


def add_parsers(sub) -> None:
    cp = add_daemon_parser(sub, "cp", help=HELP, description=DESCRIPTION,
                           usage="corral cp [OPTIONS] SANDBOX:SRC DEST|-\n"
                                 "       corral cp [OPTIONS] SRC|- SANDBOX:DEST")
    cp.add_argument("-q", "--quiet", action="store_true",
                    help="print nothing on success (default: one line on stderr)")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dest", metavar="DEST")
    cp.set_defaults(handler=cp_verb)


def split(arg: str) -> tuple[str | None, str]:
    """(sandbox id, path) of SANDBOX:PATH, or (None, arg) for a local path ('-', or one that
    starts with '/' or '.', is always local)."""
    if arg == "-" or arg.startswith(("/", ".")):
        return None, arg
    m = _REMOTE.match(arg)
    return (m.group(1), m.group(2)) if m else (None, arg)


@daemon_verb
def cp_verb(args) -> int:
    try:
        return _copy(args)
    except OSError as exc:  # a local path: one line, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        return fail(f"cp:{where}: {exc.strerror}")


def _copy(args) -> int:
    src_sb, src = split(args.src)
    dest_sb, dest = split(args.dest)
    if (src_sb is None) == (dest_sb is None):
        raise usage_error("exactly one of SRC and DEST must be SANDBOX:PATH")
    with connect(args) as client:
        if dest_sb is not None:
            line = _to_sandbox(client, src, dest_sb, dest or ".")
        else:
            line = _from_sandbox(client, src_sb, src or ".", dest)
    if line and not args.quiet:
        print(line, file=sys.stderr)
    return 0


def _stat(client: Client, sb: str, path: str):
    from corral.runtime.client import ClientError

    try:
        return client.stat_file(sb, path)
    except ClientError as exc:
        if exc.code.name == "NOT_FOUND":
            return None
        raise


def _join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}" if parent.rstrip("/") else name


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n}B"


def _to_sandbox(client: Client, src: str, sb: str, dest: str) -> str:
    if src == "-":
        info = _stat(client, sb, dest)
        if info is None or info.kind != "dir":
            raise usage_error(f"DEST: {sb}:{dest} must be an existing directory to extract a tar "
                         f"stream into")
        r = client.put_archive(sb, dest, iter(lambda: sys.stdin.buffer.read(1 << 20), b""))
        return f"extracted {r.files} files, {r.dirs} directories ({_size(r.bytes)}) " \
               f"into {sb}:{dest}" + (f"; skipped {r.skipped} devices/FIFOs" if r.skipped else "")
    try:
        local = os.lstat(src)
    except OSError as exc:
        raise usage_error(f"SRC: {src}: {exc.strerror}") from None
    info = _stat(client, sb, dest)
    name = os.path.basename(os.path.normpath(src))
    if not stat.S_ISDIR(local.st_mode):
        if info is not None and info.kind == "dir":
            dest = _join(dest, name)
        elif info is None and dest.endswith("/"):
            raise usage_error(f"DEST: {sb}:{dest} does not exist (a directory must exist)")
        if stat.S_ISLNK(local.st_mode) or not stat.S_ISREG(local.st_mode):
            raise usage_error(f"SRC: {src} is not a regular file or directory")
        r = client.upload(sb, dest, src, mode=stat.S_IMODE(local.st_mode))
        return f"copied {_size(r.size)} to {sb}:{dest} (sha256 {r.sha256})"
    # a directory, as a tar stream named for where it lands
    contents = src.endswith("/.") or src == "."
    if info is None:
        parent, _, top = dest.rstrip("/").rpartition("/")
        parent = parent or "."
    elif info.kind == "dir":
        parent, top = dest, "." if contents else name
    else:
        raise usage_error(f"DEST: {sb}:{dest} is a file; cannot copy a directory onto it")
    from corral.sandbox.archive import tar_stream

    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        r = client.put_archive(sb, parent, tar_stream(fd, top))
    finally:
        os.close(fd)
    where = dest if info is None or top == "." else _join(dest, top)
    return f"copied {r.files} files, {r.dirs} directories ({_size(r.bytes)}) to {sb}:{where}"


def _from_sandbox(client: Client, sb: str, src: str, dest: str) -> str:
    if dest == "-":
        _, chunks = client.get_archive(sb, src)
        out = sys.stdout.buffer
        for data in chunks:
            out.write(data)
        out.flush()
        return ""
    info = client.stat_file(sb, src)
    name = "workspace" if info.path == "." else info.path.rpartition("/")[2]
    local = None
    try:
        local = os.stat(dest)
    except FileNotFoundError:
        pass
    if info.kind == "file":
        if local is not None and stat.S_ISDIR(local.st_mode):
            dest = os.path.join(dest, name)
        elif local is None and dest.endswith("/"):
            raise usage_error(f"DEST: {dest} does not exist (a directory must exist)")
        end = client.download(sb, src, dest)
        os.chmod(dest, info.mode & 0o777)
        return f"copied {_size(end.size)} to {dest} (sha256 {end.sha256})"
    if info.kind != "dir":
        raise usage_error(f"SRC: {sb}:{src} is a {info.kind}; copy a file or a directory")
    if local is None:
        os.mkdir(dest, 0o755)
        target, strip = dest, 1
    elif stat.S_ISDIR(local.st_mode):
        target, strip = dest, 1 if src.endswith("/.") else 0
    else:
        raise usage_error(f"DEST: {dest} is a file; cannot copy a directory onto it")
    from corral.sandbox.archive import TarExtractor

    _, chunks = client.get_archive(sb, src)
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    extractor = TarExtractor(fd, max_bytes=_LOCAL_CAP, max_entries=_LOCAL_CAP, strip=strip,
                             owns_target=True)
    try:
        for data in chunks:
            extractor.feed(data)
        r = extractor.finish()
    finally:
        extractor.close()
    where = dest if strip else os.path.join(dest, name)
    return f"copied {r.files} files, {r.dirs} directories ({_size(r.bytes)}) to {where}"
