"""The base image: a small root filesystem assembled from the host's own binaries (no
registry is reachable), imported once per engine and tagged by a digest of its contents.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading

from ...errors import CorralError
from ...spec import SandboxSpec
from .engine import _sdk, client, engine_url
from .fds import FDS_INSIDE

IMAGE_REPOSITORY = "corral-base"


#: Bumped when the image's layout changes (part of the image tag's digest).
IMAGE_LAYOUT_VERSION = "1"


#: Host programs copied into the base image (missing ones are skipped).
IMAGE_PROGRAMS = (
    "sh", "dash", "bash", "true", "false", "cat", "echo", "printf", "sleep", "ls", "env",
    "id", "head", "tail", "timeout", "mkdir", "rmdir", "rm", "cp", "mv", "ln", "chmod",
    "touch", "wc", "sort", "uniq", "tr", "cut", "grep", "sed", "dd", "stat", "readlink",
    "realpath", "uname", "setsid", "kill", "ps", "test", "[", "yes", "seq", "nproc", "date",
    "du", "find", "xargs", "basename", "dirname", "tee", "mktemp", "pwd", "whoami",
    "hostname", "newgrp", "python3", "sha256sum", "md5sum", "base64", "od", "cmp", "tac",
    "expr", "sync", "nice", "nohup", "chown", "chgrp", "truncate", "split", "join", "paste",
    "fold", "comm", "gzip", "tar", "awk", "less", "more", "diff", "patch", "file", "which",
)


#: Parts of the host's python standard library left out of the image.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages",
               "dist-packages", "lib2to3", "config-3.11-x86_64-linux-gnu"}


def _host_python() -> str | None:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _ldd(paths: list[str]) -> set[str]:
    """Shared libraries (and the loader) the given ELF files load, as absolute paths."""
    found: set[str] = set()
    for i in range(0, len(paths), 64):
        batch = paths[i:i + 64]
        result = subprocess.run(["ldd", *batch], capture_output=True, text=True,
                                env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        for line in result.stdout.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                found.add(m.group(1))
    return found


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


class RootfsPlan:
    """Which host files make up the base image, as (path inside, host path) entries."""

    def __init__(self):
        self.files: dict[str, str] = {}  # image path -> host path of a regular file
        self.links: dict[str, str] = {}  # image path -> link target
        self.dirs: set[str] = set()
        self.generated: dict[str, bytes] = {}  # image path -> content

    def add_host_path(self, path: str) -> None:
        """Add a host file, keeping every symbolic link on the way as a link."""
        path = os.path.normpath(path)
        parent, name = os.path.split(path)
        if parent != "/":
            parent_real = self._add_dir_chain(parent)
        else:
            parent_real = "/"
        full = os.path.join(parent_real, name)
        if full in self.files or full in self.links:
            return
        if os.path.islink(full):
            target = os.readlink(full)
            self.links[full] = target
            self.add_host_path(os.path.join(parent_real, target))
        elif os.path.isfile(full):
            self.files[full] = full
        elif os.path.isdir(full):
            self.dirs.add(full)

    def _add_dir_chain(self, directory: str) -> str:
        """Record the directories (and directory links) leading to directory; returns its
        path with every link resolved."""
        resolved = "/"
        for part in directory.strip("/").split("/"):
            here = os.path.join(resolved, part)
            if os.path.islink(here):
                target = os.readlink(here)
                self.links[here] = target
                resolved = os.path.realpath(here)
                self._add_dir_chain(resolved)
            else:
                self.dirs.add(here)
                resolved = here
        return resolved

    def add_tree(self, top: str, skip: set[str]) -> None:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in skip]
            self.dirs.add(dirpath)
            for name in filenames:
                self.add_host_path(os.path.join(dirpath, name))

    def digest(self) -> str:
        h = hashlib.sha256(IMAGE_LAYOUT_VERSION.encode())
        for path in sorted(self.files):
            st = os.stat(self.files[path])
            h.update(f"f {path} {st.st_size} {st.st_mtime_ns} {st.st_mode:o}\n".encode())
        for path in sorted(self.links):
            h.update(f"l {path} {self.links[path]}\n".encode())
        for path in sorted(self.dirs):
            h.update(f"d {path}\n".encode())
        for path in sorted(self.generated):
            h.update(f"g {path} ".encode() + hashlib.sha256(self.generated[path]).digest())
        return h.hexdigest()

    def write_tar(self, out) -> None:
        with tarfile.open(fileobj=out, mode="w") as tar:
            def entry(name: str, kind, mode: int, size: int = 0, link: str = ""):
                info = tarfile.TarInfo(name.lstrip("/"))
                info.type, info.mode, info.size, info.linkname = kind, mode, size, link
                info.uid = info.gid = 0
                info.mtime = 0
                return info

            for d in sorted(self.dirs):
                mode = 0o1777 if d == "/tmp" else 0o755
                tar.addfile(entry(d, tarfile.DIRTYPE, mode))
            for path, target in sorted(self.links.items()):
                tar.addfile(entry(path, tarfile.SYMTYPE, 0o777, link=target))
            for path, host in sorted(self.files.items()):
                st = os.stat(host)
                with open(host, "rb") as f:
                    tar.addfile(entry(path, tarfile.REGTYPE, st.st_mode & 0o7777, st.st_size), f)
            for path, content in sorted(self.generated.items()):
                tar.addfile(entry(path, tarfile.REGTYPE, 0o644, len(content)),
                            io.BytesIO(content))


def rootfs_plan() -> RootfsPlan:
    """The base image's contents: host programs, their libraries, python's stdlib, a
    generated minimal /etc, Corral's agent helper, and empty mount points."""
    from ... import contain, mounts

    plan = RootfsPlan()
    search = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    elves = []
    for name in IMAGE_PROGRAMS:
        found = shutil.which(name, path=search)
        if found:
            plan.add_host_path(found)
            real = os.path.realpath(found)
            if _is_elf(real):
                elves.append(real)
    python = _host_python()
    if python:
        out = subprocess.run(
            [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
            capture_output=True, text=True, check=True)
        stdlib = out.stdout.strip()
        plan.add_tree(stdlib, STDLIB_SKIP)
        dynload = os.path.join(stdlib, "lib-dynload")
        if os.path.isdir(dynload):
            elves += [os.path.join(dynload, n) for n in os.listdir(dynload) if n.endswith(".so")]
    for lib in sorted(_ldd(elves)):
        plan.add_host_path(lib)
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.islink(top):
            plan.links[top] = os.readlink(top)
    if os.path.isfile("/etc/ld.so.cache"):
        plan.add_host_path("/etc/ld.so.cache")
    for name, content in mounts.etc_files(SandboxSpec()).items():
        if name not in ("hosts", "hostname", "resolv.conf"):  # the engine writes these
            plan.generated["/etc/" + name] = content.encode()
    # The sandbox's user (uid_base) gets a name: some programs ask for one.
    plan.generated["/etc/passwd"] += b"corral:x:100000:100000:corral:/workspace:/bin/sh\n"
    plan.generated["/etc/group"] += b"corral:x:100000:\n"
    for inside, host in contain.support_files().items():
        plan._add_dir_chain(os.path.dirname(inside))
        with open(host, "rb") as f:
            plan.generated[inside] = f.read()
    for d in ("/etc", "/tmp", "/workspace", "/proc", "/dev", "/sys", "/run", "/opt",
              FDS_INSIDE):
        plan.dirs.add(d)
    return plan


_image_lock = threading.Lock()


_images: dict[str, str] = {}


def base_image(url: str | None = None) -> str:
    """The tag of Corral's base image on the engine, imported first if it lacks it."""
    url = engine_url(url)
    with _image_lock:
        if url in _images:
            return _images[url]
        api = client(url)
        plan = rootfs_plan()
        tag = plan.digest()[:16]
        ref = f"{IMAGE_REPOSITORY}:{tag}"
        docker = _sdk()
        try:
            api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            with tempfile.TemporaryFile(prefix="corral-rootfs-") as tmp:
                plan.write_tar(tmp)
                tmp.flush()
                tmp.seek(0)
                try:
                    api.import_image_from_data(
                        tmp, repository=IMAGE_REPOSITORY, tag=tag,
                        changes=['LABEL corral.image="base"', 'CMD ["/bin/sh"]'])
                except docker.errors.APIError as exc:
                    raise CorralError(f"importing the base image into {url}: "
                                      f"{exc.explanation or exc}") from None
            api.inspect_image(ref)  # the import must have produced it
        _images[url] = ref
        return ref
