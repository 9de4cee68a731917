"""Docker backend: the same SandboxSpec on a real Docker engine, through the Engine API.

A sandbox is one container that idles (``docker-init`` reaping ``sleep infinity``) while
commands join it with ``exec``, the same init/exec model as the native backend. The spec
maps onto the container's host config: read-only root, Corral's seccomp profile (Docker
reads the same JSON format), every capability dropped, no-new-privileges, no network,
pids / memory (no swap) / CPU limits, a size-capped tmpfs /tmp, the workspace bind, a
non-root user (uid ``spec.uid_base``, the same host id that root inside a native sandbox
maps to), rlimits, and the command timeout.

No registry is reachable, so the base image is built here: ``base_image()`` assembles a
small root filesystem from the host's own binaries (shell, coreutils, python3 with its
standard library, and the shared libraries they load), imports it with ``docker import``
and tags it by a digest of its contents, so each engine builds it once.

Every container is labelled ``corral.sandbox=<id>`` and carries its creator; ``sweep()``
removes the ones whose creator is gone. When no engine answers, ``Unavailable`` says where
Corral looked and how to point it elsewhere (``DOCKER_HOST`` or ``--docker-host``).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import functools
import glob
import hashlib
import io
import json
import os
import re
import select as select_mod
import selectors
import shutil
import signal as signal_mod
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from urllib.parse import quote

from .. import fstree, seccomp, workspace_fs
from ..errors import (
    CommandNotFound,
    CorralError,
    InvalidSpec,
    SandboxSetupError,
    Unavailable,
    UnsupportedHost,
)
from ..spec import SandboxSpec
from .base import SandboxLifecycle
from .native import PIPE, CompletedRun, ExitReason

#: Label every Corral container carries: the sandbox id.
LABEL = "corral.sandbox"
#: Label naming the creator: "<boot id>:<pid>:<start time>", for sweep().
LABEL_CREATOR = "corral.creator"
#: Label holding a temporary workspace directory the sandbox owns (removed by sweep()).
LABEL_WORKSPACE = "corral.workspace"
#: Label holding the host directory of the sandbox's descriptor FIFOs (removed by sweep()).
LABEL_FDS = "corral.fds"
#: Where a sandbox's descriptor FIFOs appear inside its container (read-only bind).
FDS_INSIDE = "/run/corral-fds"
IMAGE_REPOSITORY = "corral-base"
#: Bumped when the image's layout changes (part of the image tag's digest).
IMAGE_LAYOUT_VERSION = "1"
API_VERSION = "1.41"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
#: How long the engine may take to answer one request, in seconds.
REQUEST_TIMEOUT_S = 60

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


def engine_url(explicit: str | None = None) -> str:
    """The engine to use: the explicit URL, else $DOCKER_HOST, else the standard socket."""
    return explicit or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def _sdk():
    try:
        import docker  # noqa: PLC0415 (optional dependency, imported on use)
    except ImportError:
        raise UnsupportedHost(
            "the docker backend needs the Docker SDK for Python: pip install 'corral[docker]'"
        ) from None
    return docker


_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def client(url: str | None = None):
    """A connected low-level API client for the engine at url (cached per URL).

    Raises:
        Unavailable: no engine answers there.
        UnsupportedHost: the docker SDK is not installed.
    """
    url = engine_url(url)
    with _clients_lock:
        api = _clients.get(url)
    if api is not None:
        return api
    docker = _sdk()
    try:
        api = docker.APIClient(base_url=url, version=API_VERSION, timeout=REQUEST_TIMEOUT_S)
        api.ping()
    except Exception as exc:  # the SDK raises requests/urllib3/OS errors alike
        raise Unavailable(
            f"no Docker engine answers at {url} ({_reason(exc)}); start dockerd, or point "
            f"Corral at one with DOCKER_HOST or --docker-host"
        ) from None
    with _clients_lock:
        _clients.setdefault(url, api)
        return _clients[url]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for pattern in (r"\[Errno \d+\] [^')\]]+", r"No such file or directory",
                    r"Connection refused"):
        m = re.search(pattern, text)
        if m:
            return m.group(0)
    return text[:200]


def _is_fd(how) -> bool:
    """An open descriptor given for stdin/stdout/stderr (not PIPE, DEVNULL or None)."""
    return isinstance(how, int) and how >= 0


def _is_local(url: str) -> bool:
    """Whether the engine runs on this host (its pids and cgroups are ours to see)."""
    return url.startswith("unix://") or url.startswith("/")


# -- the base image ---------------------------------------------------------------------------


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
    from .. import contain, mounts

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


# -- creators and the sweep -------------------------------------------------------------------


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _creator() -> str:
    return f"{_boot_id()}:{os.getpid()}:{_start_time(os.getpid())}"


def _creator_alive(value: str) -> bool:
    try:
        boot, pid, start = value.split(":")
    except ValueError:
        return False
    if boot != _boot_id():
        return False
    return _start_time(int(pid)) == start


def sweep(url: str | None = None) -> list[str]:
    """Remove Corral containers (and their temporary workspaces) whose creator is gone;
    returns the sandbox ids removed."""
    api = client(url)
    removed = []
    for info in api.containers(all=True, filters={"label": LABEL}):
        labels = info.get("Labels") or {}
        if _creator_alive(labels.get(LABEL_CREATOR, "")):
            continue
        with contextlib.suppress(Exception):
            api.remove_container(info["Id"], force=True, v=True)
        _remove_workspace(labels.get(LABEL_WORKSPACE))
        _remove_workspace(labels.get(LABEL_FDS))
        removed.append(labels.get(LABEL, info["Id"][:12]))
    return removed


def _remove_workspace(path: str | None) -> None:
    """Remove a temporary workspace a container's label names (only ones Corral made)."""
    if workspace_fs.is_managed(path):
        workspace_fs.remove(path)
    elif path and os.path.basename(path).startswith("corral.sbx-"):  # an older version's
        fstree.remove_tree(path, ignore_errors=True)


# -- policy -> Engine API ---------------------------------------------------------------------


def seccomp_option(profile: str) -> str:
    """The security option carrying the spec's seccomp profile (validated first)."""
    loaded = seccomp.load_profile(profile)
    if loaded.unconfined:
        return "seccomp=unconfined"
    if loaded.source == "builtin":
        path = os.path.join(os.path.dirname(seccomp.__file__), "profiles", f"{profile}.json")
    else:
        path = loaded.source
    with open(path, "rb") as f:
        doc = json.load(f)
    return "seccomp=" + json.dumps(doc, separators=(",", ":"))


def container_config(api, spec: SandboxSpec, image: str, sandbox_id: str, workspace: str,
                     own_workspace: bool, fds_dir: str | None = None) -> dict:
    """The create-container request for a spec (keyword arguments of create_container)."""
    docker = _sdk()
    user = f"{spec.uid_base}:{spec.uid_base}"
    mounts = [docker.types.Mount("/workspace", workspace, type="bind", read_only=False)]
    for b in spec.binds:
        mounts.append(docker.types.Mount(b.target, b.source, type="bind",
                                         read_only=not b.writable))
    if fds_dir is not None:  # FIFOs for pass_fds; writable as FIFOs even on a read-only bind
        mounts.append(docker.types.Mount(FDS_INSIDE, fds_dir, type="bind", read_only=True))
    host_config = api.create_host_config(
        read_only=True,
        security_opt=["no-new-privileges:true", seccomp_option(spec.profile)],
        cap_drop=["ALL"],
        network_mode="none",
        ipc_mode="private",
        pids_limit=spec.pids_max,
        mem_limit=spec.memory_bytes,
        memswap_limit=spec.memory_bytes,  # no swap
        nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={spec.tmp_bytes},mode=1777"},
        shm_size=spec.tmp_bytes,
        mounts=mounts,
        ulimits=[
            docker.types.Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile),
            docker.types.Ulimit(name="fsize", soft=spec.fsize_bytes, hard=spec.fsize_bytes),
            docker.types.Ulimit(name="core", soft=0, hard=0),
        ],
        init=True,
    )
    labels = {LABEL: sandbox_id, LABEL_CREATOR: _creator()}
    if own_workspace:
        labels[LABEL_WORKSPACE] = workspace
    if fds_dir is not None:
        labels[LABEL_FDS] = fds_dir
    labels.update({f"corral.label.{k}": v for k, v in spec.labels})
    return dict(
        image=image, command=["sleep", "infinity"], hostname=spec.hostname, user=user,
        working_dir="/workspace", environment=spec.environment(), labels=labels,
        host_config=host_config, network_disabled=True, stop_signal="SIGKILL",
        name=f"corral-{sandbox_id}",
    )


# -- commands ---------------------------------------------------------------------------------


class _Stdin:
    """The write side of a command's stdin: the exec connection's sending half."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.closed = False

    def write(self, data: bytes) -> int:
        """Send all of data (waiting for room: pump() may have made the socket
        non-blocking from another thread)."""
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view):]
            except (BlockingIOError, InterruptedError):
                select_mod.select([], [self._sock], [], 1.0)
        return len(data)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)


class DockerProcess:
    """A command running in a Docker sandbox (an exec instance).

    Output arrives multiplexed on the exec's hijacked connection; ``pump()`` splits it
    into stdout and stderr as it comes. Exit codes come from the engine, which reports a
    command killed by signal N as 128+N: ``returncode`` turns that into -N, as native does.
    """

    def __init__(self, sandbox: DockerSandbox, exec_id: str, sock: socket.socket,
                 leftover: bytes, argv: list[str], timeout_s: float | None, oom_before: int,
                 want_stdin: bool, keep: tuple[bool, bool]):
        self.sandbox = sandbox
        self.exec_id = exec_id
        self.argv = tuple(argv)
        self._sock = sock
        self._buf = bytearray(leftover)
        self._eof = False
        self.stdin = _Stdin(sock) if want_stdin else None
        self._keep = keep
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s if timeout_s else None
        self.returncode: int | None = None
        self.reason: ExitReason | None = None
        self.on_exit = None
        self._oom_before = oom_before
        self._timed_out = False
        self._pid = 0
        self._pumping = False
        #: Called once when the command has ended (the descriptor relays stop then).
        self._on_finish: list = []
        if not want_stdin:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    @property
    def pid(self) -> int:
        """Host pid of the command (0 when the engine does not say, or it ended)."""
        if not self._pid:
            with contextlib.suppress(Exception):
                self._pid = int(self.sandbox.api.exec_inspect(self.exec_id).get("Pid") or 0)
        return self._pid

    def send_signal(self, sig: int) -> None:
        """Signal the command (a local engine only: the engine has no exec-signal call)."""
        if self.returncode is None and self.pid and self.sandbox.local:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.returncode is not None:
            return
        if self.pid and self.sandbox.local:
            self.send_signal(signal_mod.SIGKILL)
        else:  # nothing else reaches an exec's process: end the whole sandbox
            self.sandbox.destroy()

    def expire(self) -> None:
        self._timed_out = True
        self.kill()

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    # -- output ---------------------------------------------------------------------------

    def _frames(self, on_stdout, on_stderr) -> None:
        """Hand every complete frame in the buffer to its sink."""
        buf = self._buf
        while len(buf) >= 8:
            kind, size = buf[0], struct.unpack_from(">I", buf, 4)[0]
            if len(buf) < 8 + size:
                break
            payload = bytes(buf[8:8 + size])
            del buf[:8 + size]
            if kind == 2:
                if on_stderr is not None:
                    on_stderr(payload)
            elif on_stdout is not None:
                on_stdout(payload)

    def pump(self, on_stdout, on_stderr, input: bytes | None = None, *,
             close_stdin: bool = True) -> int:
        """Copy output to the callbacks as it comes, feed stdin; returns the exit code.

        The spec's timeout is enforced meanwhile (the command is killed when it passes).
        """
        on_stdout = on_stdout if self._keep[0] else None
        on_stderr = on_stderr if self._keep[1] else None
        if self._sock is None:  # already drained and closed
            self._frames(on_stdout, on_stderr)
            return self.wait()
        self._pumping = True
        self._frames(on_stdout, on_stderr)
        pending = memoryview(input or b"")
        if self.stdin is not None and not pending and close_stdin:
            self.stdin.close()
        sel = selectors.DefaultSelector()
        self._sock.setblocking(False)
        events = selectors.EVENT_READ
        if pending and self.stdin is not None:
            events |= selectors.EVENT_WRITE
        sel.register(self._sock, events)
        expired = False
        try:
            while not self._eof:
                remaining = None if expired else self.remaining()
                if remaining == 0:
                    self.expire()
                    expired, remaining = True, 5.0
                for _key, mask in sel.select(remaining):
                    if mask & selectors.EVENT_WRITE:
                        try:
                            n = self._sock.send(pending[:65536])
                            pending = pending[n:]
                        except (BlockingIOError, InterruptedError):
                            n = 0
                        except OSError:
                            pending = pending[:0]
                        if not pending:
                            self.stdin.close()
                            sel.modify(self._sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        self._read(on_stdout, on_stderr)
                if expired and self.sandbox.state != "running":
                    break
        finally:
            sel.close()
            self._close()
        return self.wait()

    def _relay(self, stdin_fd: int | None, stdout_fd: int | None, stderr_fd: int | None,
               on_end) -> None:
        """Copy between the caller's descriptors and the exec's connection on threads of
        our own (the caller may close its descriptors as soon as exec() returns)."""
        ins = os.dup(stdin_fd) if stdin_fd is not None else None
        outs = [os.dup(fd) if fd is not None else None for fd in (stdout_fd, stderr_fd)]
        self.stdin = None if ins is not None else self.stdin

        def sink(fd):
            if fd is None:
                return lambda _chunk: None

            def write(chunk: bytes) -> None:
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        select_mod.select([], [fd], [], 1.0)
                    except OSError:
                        return  # the reader went away: drop the rest
            return write

        sock = self._sock  # pump() drops its reference when the command has ended

        def feed() -> None:
            try:
                writer = _Stdin(sock)
                while True:
                    chunk = os.read(ins, 65536)
                    if not chunk:
                        break
                    writer.write(chunk)
            except OSError:
                pass
            finally:
                os.close(ins)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

        def copy_out() -> None:
            try:
                self.pump(sink(outs[0]), sink(outs[1]), close_stdin=False)
            except Exception:  # the sandbox went away under us
                self._finish(None)
            finally:
                for fd in outs:
                    if fd is not None:
                        os.close(fd)
                on_end()

        if ins is not None:
            threading.Thread(target=feed, name=f"corral-docker-in-{self.exec_id[:8]}",
                             daemon=True).start()
        threading.Thread(target=copy_out, name=f"corral-docker-out-{self.exec_id[:8]}",
                         daemon=True).start()

    def _read(self, on_stdout, on_stderr) -> None:
        while True:
            try:
                chunk = self._sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                self._frames(on_stdout, on_stderr)
                return
            self._buf += chunk
            self._frames(on_stdout, on_stderr)

    def _read_to_eof(self, timeout_s: float = 5.0) -> bytes:
        """Read everything left on the connection into the buffer (a command that has
        already ended); returns the buffer's raw bytes."""
        self._sock.settimeout(timeout_s)
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(65536):
                self._buf += chunk
        self._eof = True
        return bytes(self._buf)

    def _absorb(self) -> None:
        """Take what the connection holds, without blocking, so that output nobody reads
        cannot stall the command: frames of streams asked for stay buffered for a later
        pump(), the rest is dropped."""
        if self._sock is None or self._eof or self._pumping:
            return
        with contextlib.suppress(OSError):
            self._sock.setblocking(False)
            while True:
                try:
                    chunk = self._sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    self._eof = True
                    break
                self._buf += chunk
        if not any(self._keep):
            self._frames(None, None)

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def communicate(self, input: bytes | None = None) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        self.pump(out.extend, err.extend, input)
        return bytes(out), bytes(err)

    # -- exit -----------------------------------------------------------------------------

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.sandbox.state != "running":
                self._finish(None)
            else:
                try:
                    info = self.sandbox.api.exec_inspect(self.exec_id)
                except Exception:
                    self._finish(None)
                else:
                    if not info.get("Running") and info.get("ExitCode") is not None:
                        self._finish(int(info["ExitCode"]))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; the spec's timeout kills the command when it passes.

        Raises:
            TimeoutError: ``timeout`` (the caller's, not the spec's) passed first.
        """
        end = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while self.poll() is None:
            self._absorb()
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline and not self._timed_out:
                self.expire()
            if end is not None and now >= end:
                raise TimeoutError(f"{self.argv[0]} still running after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode

    def _finish(self, code: int | None) -> None:
        if self.returncode is not None:
            return
        if code is None:  # the sandbox went away first
            self.returncode = -signal_mod.SIGKILL
            self.reason = ExitReason.TIMEOUT if self._timed_out else ExitReason.SIGNALED
        elif code > 128 and code - 128 < 65:
            sig = code - 128
            self.returncode = -sig
            if self._timed_out:
                self.reason = ExitReason.TIMEOUT
            elif sig == signal_mod.SIGKILL and self.sandbox._oom_kills() > self._oom_before:
                self.reason = ExitReason.OOM
            else:
                self.reason = ExitReason.SIGNALED
        else:
            self.returncode = code
            self.reason = ExitReason.TIMEOUT if self._timed_out else ExitReason.EXITED
        if self._eof or not any(self._keep):
            self._close()  # else output may still be on its way: pump() reads it, then closes
        for hook in self._on_finish:
            with contextlib.suppress(Exception):
                hook()
        if self.on_exit is not None:
            self.on_exit(self)


# -- sandboxes --------------------------------------------------------------------------------


def _frame_payloads(raw: bytes) -> bytes:
    """The payloads of the complete stream frames (8-byte header: kind, 0, 0, 0, size) at
    the start of raw, joined in order; stops at the first thing that is not a frame."""
    out = bytearray()
    at = 0
    while at + 8 <= len(raw) and raw[at] in (0, 1, 2) and raw[at + 1:at + 4] == b"\0\0\0":
        size = struct.unpack_from(">I", raw, at + 4)[0]
        if at + 8 + size > len(raw):
            break
        out += raw[at + 8:at + 8 + size]
        at += 8 + size
    return bytes(out)


def _wrapper_state(pid: int) -> str:
    """"wrapper" while pid still runs _PassedFds' shell, "exec'd" once it runs the command,
    "gone" when it has exited (read from /proc: the engine is local)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return "gone"
    if not parts or parts == [b""]:
        return "gone"  # a zombie has no command line
    if parts[:2] == [b"/bin/sh", b"-c"] and parts[3:4] == [b"corral-exec"]:
        return "wrapper"
    return "exec'd"


class _PassedFds:
    """Descriptors handed to a command (``pass_fds``) across the engine, through FIFOs.

    Nothing but bytes crosses into a container, so each {fd inside: fd here} becomes a FIFO
    in the sandbox's host-side fds directory, bound read-only at FDS_INSIDE (a FIFO stays
    writable on a read-only mount). The command is started through ``sh -c 'exec 3>FIFO
    4<FIFO; exec "$@"'``, and a relay thread per descriptor copies between the FIFO and the
    caller's descriptor: out of the sandbox when the caller passed a write end (the agent
    protocol's events fd), into it for a read end (the control fd). The host side holds each
    FIFO open read-write, so no open ever blocks; relays stop when the command ends.
    """

    def __init__(self, sandbox: DockerSandbox, pass_fds: dict[int, int]):
        self.links: list[tuple[str, int, int, str]] = []  # (direction, fifo fd, dup, path)
        self.redirections: list[str] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._lock = threading.Lock()
        tag = os.urandom(4).hex()
        try:
            for inside, here in sorted(pass_fds.items()):
                if not 3 <= inside <= 9:
                    raise InvalidSpec("pass_fds", f"descriptor {inside}: the docker backend "
                                                  "passes descriptors 3 to 9")
                access = fcntl.fcntl(here, fcntl.F_GETFL) & os.O_ACCMODE
                if access not in (os.O_WRONLY, os.O_RDONLY):
                    raise InvalidSpec("pass_fds", f"descriptor {inside}: pass one end of a "
                                                  "pipe (read or write), not a read-write one")
                name = f"{tag}-{inside}"
                path = os.path.join(sandbox._fds_dir, name)
                os.mkfifo(path, 0o600)
                if os.geteuid() == 0:
                    os.chown(path, sandbox.spec.uid_base, sandbox.spec.uid_base)
                fifo = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                direction = "out" if access == os.O_WRONLY else "in"
                self.links.append((direction, fifo, os.dup(here), path))
                arrow = ">" if direction == "out" else "<"
                self.redirections.append(f"{inside}{arrow}{FDS_INSIDE}/{name}")
        except BaseException:
            self.close()
            raise

    def wrap(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", f"exec {' '.join(self.redirections)}; exec \"$@\"",
                "corral-exec", *argv]

    def start(self) -> None:
        self._running = len(self.links)
        for link in self.links:
            t = threading.Thread(target=self._copy, args=link, daemon=True,
                                 name=f"corral-docker-fd-{link[0]}")
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """The command ended: relays drain what is left and close (from _finish)."""
        with contextlib.suppress(OSError):
            os.close(self._stop_w)
        self._stop_w = -1

    def close(self) -> None:
        self.stop()
        for _direction, fifo, here, path in self.links:
            for fd in (fifo, here):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.links = []
        with contextlib.suppress(OSError):
            os.close(self._stop_r)

    def _copy(self, direction: str, fifo: int, here: int, path: str) -> None:
        src, dst = (fifo, here) if direction == "out" else (here, fifo)
        try:
            while True:
                ready, _, _ = select_mod.select([src, self._stop_r], [], [])
                if src in ready:
                    try:
                        chunk = os.read(src, 65536)
                    except BlockingIOError:
                        chunk = None
                    if chunk == b"":
                        break  # the caller closed its end (control) or no writer left
                    if chunk:
                        _write_all(dst, chunk)
                        continue
                if self._stop_r in ready:
                    if direction == "out":  # what the command wrote before it ended
                        with contextlib.suppress(BlockingIOError, OSError):
                            while chunk := os.read(fifo, 65536):
                                _write_all(here, chunk)
                    break
        except OSError:
            pass
        finally:
            for fd in (fifo, here):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                with contextlib.suppress(OSError):
                    os.close(self._stop_r)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select_mod.select([], [fd], [], 1.0)


@dataclass(frozen=True)
class _Prepared:
    seccomp_profile: seccomp.SeccompProfile


class DockerSandbox(SandboxLifecycle):
    """A sandbox on a Docker engine: create / exec / signal / destroy (a context manager)."""

    _swept: set[str] = set()

    def __init__(self, spec: SandboxSpec | None = None, *, docker_host: str | None = None,
                 name: str | None = None):
        self.spec = spec or SandboxSpec()
        self.id = name or "sbx-" + os.urandom(6).hex()
        self.url = engine_url(docker_host)
        self.local = _is_local(self.url)
        self.state = "new"
        self.container_id: str | None = None
        self.init_pid: int | None = None
        self.workspace: str | None = None
        self._own_workspace = False
        self._lock = threading.Lock()
        self.api = None
        #: Readable when a relayed command ended (the daemon's loop watches it); see
        #: collect_exits(). Same role as the native backend's status pipe.
        self.status_fd = self._status_w = -1
        self._status_lock = threading.Lock()
        self._procs: weakref.WeakSet[DockerProcess] = weakref.WeakSet()
        self._fds_dir: str | None = None
        #: What the policy digest is computed from (the native backend's Prepared shape).
        self._prepared: _Prepared | None = None

    def start(self) -> None:
        """Create and start the container.

        Raises:
            Unavailable: no engine answers.
            InvalidSpec: the profile is unusable, or the engine refused the config.
            CorralError: the engine failed to create or start the container.
        """
        if self.state != "new":
            raise CorralError(f"sandbox {self.id} is {self.state}, not new")
        if getattr(self.spec, "allow_net", ()):
            raise InvalidSpec("allow_net", "the docker backend runs without a network; egress "
                                           "through Corral's proxy needs the native backend")
        if getattr(self.spec, "devices", ()):
            raise InvalidSpec("devices", "the docker backend does not grant host devices")
        self.api = client(self.url)
        docker = _sdk()
        if self.url not in DockerSandbox._swept:
            DockerSandbox._swept.add(self.url)
            sweep(self.url)
        image = base_image(self.url)
        self.state = "starting"
        self.status_fd, self._status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if self.spec.uid_base is None:  # its own host ids, as a native sandbox's
                from .. import ids

                self._ids = ids.allocate(self.id) if os.geteuid() == 0 else ids.IdRange(
                    os.getuid(), 1)
                self.spec = self.spec.with_ids(self._ids.base, self._ids.count)
            self._setup_workspace()
            self._fds_dir = tempfile.mkdtemp(prefix=f"corral.{self.id}.fds.")
            if os.geteuid() == 0:
                os.chown(self._fds_dir, self.spec.uid_base, self.spec.uid_base)
            os.chmod(self._fds_dir, 0o700)
            config = container_config(self.api, self.spec, image, self.id, self.workspace,
                                      self._own_workspace, self._fds_dir)
            try:
                self.container_id = self.api.create_container(**config)["Id"]
                self.api.start(self.container_id)
                info = self.api.inspect_container(self.container_id)
            except docker.errors.APIError as exc:
                message = exc.explanation or str(exc)
                if exc.status_code == 400 or "invalid" in str(message).lower():
                    raise InvalidSpec("spec", f"the engine refused it: {message}") from None
                raise CorralError(f"docker: creating sandbox {self.id}: {message}") from None
            self.init_pid = int(info["State"].get("Pid") or 0) or None
            self._prepared = _Prepared(seccomp.load_profile(self.spec.profile))
            self.state = "running"
        except BaseException:
            self._cleanup()
            raise

    def _setup_workspace(self) -> None:
        if self.spec.workspace:
            self.workspace = self.spec.workspace
            return
        # A capped tmpfs (nosuid, nodev) under a 0700 parent: see sandbox/workspace_fs.py.
        self.workspace = workspace_fs.create(self.id, self.spec.uid_base, self.spec.uid_base)
        self._own_workspace = True

    def destroy(self) -> None:
        """Remove the container (killing everything in it) and its temporary workspace.
        Idempotent."""
        with self._lock:
            if self.state in ("destroyed", "new"):
                self.state = "destroyed"
                return
            self.state = "destroying"
        self._cleanup()

    def _cleanup(self) -> None:
        if self.container_id is not None and self.api is not None:
            docker = _sdk()
            for _ in range(3):
                try:
                    self.api.remove_container(self.container_id, force=True, v=True)
                    break
                except docker.errors.NotFound:
                    break
                except Exception:
                    time.sleep(0.2)
            self.container_id = None
        if self._own_workspace and self.workspace:
            workspace_fs.remove(self.workspace)
            self._own_workspace = False
        if getattr(self, "_ids", None) is not None:
            self._ids.release()
        if self._fds_dir is not None:
            shutil.rmtree(self._fds_dir, ignore_errors=True)
            self._fds_dir = None
        for proc in list(self._procs):
            if proc._eof or not proc._pumping:  # a pump in progress closes its own
                proc._close()
        with self._status_lock:
            for fd in (self.status_fd, self._status_w):
                if fd >= 0:
                    os.close(fd)
            self.status_fd = self._status_w = -1
        self.state = "destroyed"

    # -- commands -------------------------------------------------------------------------

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str = "/workspace", stdin: int | None = PIPE, stdout: int | None = PIPE,
             stderr: int | None = PIPE, timeout_s: float | None = None,
             pass_fds: dict[int, int] | None = None,
             tty: tuple[int, int] | None = None) -> DockerProcess:
        """Run argv in the sandbox; returns the running DockerProcess.

        Args:
            env: extra variables on top of the spec's environment.
            stdin, stdout, stderr: PIPE, DEVNULL/None, or an open descriptor. Descriptors do
                not cross to an engine: a relay thread copies between them and the exec's
                connection (stdout and stderr must then both be descriptors or DEVNULL).
            timeout_s: wall-clock limit, defaults to the spec's.
            tty: refused (InvalidSpec): this backend has no terminals yet.

        Raises:
            CommandNotFound: argv[0] does not exist or cannot be executed in the sandbox.
            CorralError: the engine refused the exec.
            InvalidSpec: tty was asked for.
        """
        if tty is not None:
            # The engine's own Tty exec (and exec resize) is not wired up: refused rather
            # than run without the terminal the caller asked for.
            raise InvalidSpec("tty", "the docker backend does not give commands a terminal "
                                     "(yet); use the native backend for a tty")
        if self.state != "running":
            raise CorralError(f"sandbox {self.id} is {self.state}; cannot exec")
        if not argv:
            raise InvalidSpec("argv", "the command is empty")
        relay = any(_is_fd(h) for h in (stdout, stderr))
        if relay and PIPE in (stdout, stderr):
            raise InvalidSpec("stdout", "give descriptors (or DEVNULL) for both outputs, or "
                                        "PIPE for both")
        docker = _sdk()
        environment = self.spec.environment()
        for key, value in (env or {}).items():
            environment = [e for e in environment if not e.startswith(key + "=")]
            environment.append(f"{key}={value}")
        passed = _PassedFds(self, pass_fds) if pass_fds else None
        command = passed.wrap(list(argv)) if passed else list(argv)
        try:
            exec_id = self.api.exec_create(
                self.container_id, command, stdout=True, stderr=True,
                stdin=stdin == PIPE or _is_fd(stdin),
                user=f"{self.spec.uid_base}:{self.spec.uid_base}",
                environment=environment, workdir=cwd)["Id"]
        except docker.errors.APIError as exc:
            if passed:
                passed.close()
            raise CorralError(f"docker: exec in {self.id}: {exc.explanation or exc}") from None
        except BaseException:
            if passed:
                passed.close()
            raise
        oom_before = self._oom_kills()
        try:
            sock, leftover = self._start_exec(exec_id)
        except BaseException:
            if passed:
                passed.close()
            raise
        keep = (stdout == PIPE or _is_fd(stdout), stderr == PIPE or _is_fd(stderr))
        self._procs.add(proc := DockerProcess(self, exec_id, sock, leftover, list(argv),
                             timeout_s if timeout_s is not None else self.spec.timeout_s,
                             oom_before, stdin == PIPE or _is_fd(stdin), keep))
        if passed:
            proc._on_finish.append(passed.stop)
            passed.start()
        self._check_started(proc, cwd, wrapped=passed is not None)
        if relay or _is_fd(stdin):
            proc._relay(stdin if _is_fd(stdin) else None,
                        stdout if _is_fd(stdout) else None,
                        stderr if _is_fd(stderr) else None, self._notify_exit)
        return proc

    def _notify_exit(self) -> None:
        """Wake whoever watches status_fd: a relayed command has ended."""
        with self._status_lock, contextlib.suppress(OSError):
            if self._status_w >= 0:
                os.write(self._status_w, b"x")

    def collect_exits(self) -> int:
        """Drain status_fd's wake-ups; returns how many commands ended since the last call
        (their on_exit callbacks have already run, from the relay threads)."""
        count = 0
        with self._status_lock, contextlib.suppress(OSError):
            while self.status_fd >= 0:
                chunk = os.read(self.status_fd, 4096)
                if not chunk:
                    break
                count += len(chunk)
        return count

    def _check_started(self, proc: DockerProcess, cwd: str, wrapped: bool = False) -> None:
        """Wait until the engine has started the command (learning its pid), or tell
        CommandNotFound when the runtime could not execute it."""
        delay = 0.0005
        give_up = time.monotonic() + REQUEST_TIMEOUT_S
        while True:
            if time.monotonic() > give_up:  # the engine never said: the pid stays unknown
                return
            try:
                info = self.api.exec_inspect(proc.exec_id)
            except Exception:
                return
            if info.get("Running") and info.get("Pid"):  # Running comes before the Pid
                pid = int(info["Pid"])
                # Through the pass_fds wrapper, a running pid is the shell, not yet the
                # command: wait for its exec (or its exit, 127 when argv[0] is missing).
                state = _wrapper_state(pid) if wrapped and self.local else "exec'd"
                if state == "exec'd":
                    proc._pid = pid
                    return
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
                continue
            code = info.get("ExitCode")
            if code is not None:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        if code not in (126, 127):
            return
        raw = proc._read_to_eof()
        # The engine's own message comes raw; the wrapper shell's in stream frames, and a
        # shell may write one line in several pieces (each its own frame when the engine
        # reads them apart): match against the payloads joined as well as the raw bytes.
        text = raw.decode(errors="replace") + "\n" + _frame_payloads(raw).decode(errors="replace")
        wrapper_failed = wrapped and (f"exec: {proc.argv[0]}: not found" in text
                                      or f"exec: {proc.argv[0]}: Permission denied" in text)
        if "OCI runtime exec failed" in text or wrapper_failed:
            proc._finish(code)
            if "chdir" in text:
                raise SandboxSetupError("chdir", cwd, errno_mod.ENOENT)
            raise CommandNotFound(proc.argv[0], 2 if "not found" in text or "no such" in text
                                  else 13)

    def _start_exec(self, exec_id: str) -> tuple[socket.socket, bytes]:
        """Start an exec and take over its connection; returns it and any bytes read past
        the response headers (output that arrived with them)."""
        body = json.dumps({"Detach": False, "Tty": False}).encode()
        path = f"/v{API_VERSION}/exec/{quote(exec_id)}/start"
        request = (f"POST {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: corral\r\n"
                   f"Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        sock = self._connect()
        try:
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                if not chunk:
                    raise CorralError(f"docker: the engine closed the exec connection of {self.id}")
                head += chunk
            header, _, rest = head.partition(b"\r\n\r\n")
            status = header.split(b"\r\n", 1)[0].split()
            if len(status) < 2 or status[1] not in (b"101", b"200"):
                raise CorralError(f"docker: exec start in {self.id} failed: "
                                  f"{header.decode(errors='replace')[:200]} "
                                  f"{rest.decode(errors='replace')[:300]}")
            if b"chunked" in header.lower() and status[1] == b"200":
                raise CorralError("docker: the engine answered exec start without upgrading")
            return sock, rest
        except BaseException:
            sock.close()
            raise

    def _connect(self) -> socket.socket:
        url = self.url
        if url.startswith("unix://") or url.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(url[len("unix://"):] if url.startswith("unix://") else url)
            return sock
        m = re.match(r"^(?:tcp|http)://([^:/]+):(\d+)/?$", url)
        if not m:
            raise UnsupportedHost(f"docker backend: cannot stream from {url}; use unix:// or "
                                  f"tcp://HOST:PORT without TLS")
        return socket.create_connection((m.group(1), int(m.group(2))), timeout=REQUEST_TIMEOUT_S)

    def signal(self, sig: int) -> int:
        """Send sig to every process of the sandbox but its init; returns how many got it."""
        if self.state != "running":
            return 0
        sent = 0
        for pid in self.pids():
            if pid == self.init_pid:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                sent += 1
        return sent

    def pids(self) -> list[int]:
        """Host pids of the container's processes (a local engine: its cgroup's members)."""
        if self.state != "running" or not self.local:
            return []
        pids: set[int] = set()
        for path in self._cgroup_paths("cgroup.procs"):
            with contextlib.suppress(OSError):
                with open(path) as f:
                    pids.update(int(x) for x in f.read().split())
        return sorted(pids)

    def _cgroup_paths(self, leaf: str) -> list[str]:
        """Files of the container's cgroup as the host sees them (v1: every controller)."""
        if not self.init_pid:
            return []
        try:
            with open(f"/proc/{self.init_pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                out.append(f"/sys/fs/cgroup{path}/{leaf}")
            elif leaf == "cgroup.procs" and "pids" in controllers.split(","):
                out.append(f"/sys/fs/cgroup/pids{path}/{leaf}")
            elif leaf.startswith("memory.") and "memory" in controllers.split(","):
                out.append(f"/sys/fs/cgroup/memory{path}/{leaf}")
        return out

    def _oom_kills(self) -> int:
        """How many processes the memory limit has killed so far."""
        if self.local:
            for leaf in ("memory.oom_control", "memory.events"):
                for path in self._cgroup_paths(leaf):
                    with contextlib.suppress(OSError, ValueError):
                        with open(path) as f:
                            for line in f:
                                if line.startswith("oom_kill "):
                                    return int(line.split()[1])
        try:
            state = self.api.inspect_container(self.container_id)["State"]
        except Exception:
            return 0
        return 1 if state.get("OOMKilled") else 0

    def stats(self) -> dict:
        """Usage counters from the engine's one-shot stats (same keys as the native
        backend's; a key the engine does not report is absent)."""
        out: dict = {"oom_kills": self._oom_kills()}
        try:
            raw = self.api.stats(self.container_id, stream=False, one_shot=True)
        except Exception:
            out["pids"] = len(self.pids())
            return out
        memory = raw.get("memory_stats") or {}
        cpu = ((raw.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        pids = (raw.get("pids_stats") or {}).get("current")
        for key, value in (("memory_bytes", memory.get("usage")),
                           ("memory_peak_bytes", memory.get("max_usage")),
                           ("pids", pids),
                           ("cpu_usage_us", None if cpu is None else cpu // 1000)):
            if value is not None:
                out[key] = int(value)
        blkio = (raw.get("blkio_stats") or {}).get("io_service_bytes_recursive")
        if blkio is not None:
            totals = {"read": 0, "write": 0}
            for entry in blkio:
                op = str(entry.get("op", "")).lower()
                if op in totals:
                    totals[op] += int(entry.get("value", 0))
            out["io_read_bytes"], out["io_write_bytes"] = totals["read"], totals["write"]
        return out


def run(argv: list[str], spec: SandboxSpec | None = None, *, input: bytes | None = None,
        timeout_s: float | None = None, docker_host: str | None = None) -> CompletedRun:
    """Run one command in a fresh Docker sandbox and remove it; returns its CompletedRun."""
    started = time.monotonic()
    with DockerSandbox.create(spec, docker_host=docker_host) as sandbox:
        proc = sandbox.exec(argv, timeout_s=timeout_s)
        out, err = proc.communicate(input)
    return CompletedRun(tuple(argv), proc.returncode, out, err, proc.reason,
                        time.monotonic() - started)


# -- a private engine -------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class PrivateEngine:
    """A dockerd of our own: private socket, data root and containerd, no host networking
    (no bridge, no iptables rules, --ip-forward=false: dockerd would otherwise turn the
    host's net.ipv4.ip_forward on).

    For tests, benchmarks and probe runs on a machine that has dockerd installed but
    should not share (or does not run) a system engine. ``stop()`` ends it and removes
    everything it stored.
    """

    def __init__(self, base: str | None = None, storage_driver: str | None = None):
        #: The host's net.ipv4.ip_forward when the engine started (it must not change it).
        self.ip_forward_before: str | None = None
        #: Its containerd namespace and cgroup parent ("corral-dockerd-<hex>").
        self.name: str | None = None
        self.dir = tempfile.mkdtemp(prefix="corral.dockerd.", dir=base)
        self.socket = os.path.join(self.dir, "docker.sock")
        self.url = "unix://" + self.socket
        self.storage_driver = storage_driver
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 60.0) -> PrivateEngine:
        """Start dockerd and wait until it answers.

        Raises:
            UnsupportedHost: dockerd is not installed.
            Unavailable: it did not come up (its log's tail is in the message).
        """
        dockerd = shutil.which("dockerd", path="/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin")
        if dockerd is None:
            raise UnsupportedHost("dockerd is not installed (Debian: apt-get install docker.io)")
        PrivateEngine.sweep(os.path.dirname(self.dir))
        self.ip_forward_before = _read_text("/proc/sys/net/ipv4/ip_forward")
        # containerd namespaces and the cgroup parent: [A-Za-z0-9._-] only
        name = self.name = "corral-dockerd-" + os.urandom(4).hex()
        with open(os.path.join(self.dir, "owner"), "w") as f:
            f.write(f"{_creator()}\n{name}\n")
        argv = [dockerd, "--host", self.url, "--data-root", os.path.join(self.dir, "data"),
                "--exec-root", os.path.join(self.dir, "exec"),
                "--pidfile", os.path.join(self.dir, "dockerd.pid"),
                "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--ip-forward=false",
                "--bridge=none",
                "--containerd-namespace", name, "--containerd-plugins-namespace", name + "-p",
                "--cgroup-parent", "/" + name,
                "--log-level=warn", "--no-new-privileges"]
        for driver in ([self.storage_driver] if self.storage_driver else ["overlay2", "vfs"]):
            self._log = open(os.path.join(self.dir, "dockerd.log"), "ab")
            self.proc = subprocess.Popen([*argv, f"--storage-driver={driver}"],
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready(timeout_s):
                self.storage_driver = driver
                return self
            self._end_process()
        tail = self.log_tail()
        self.stop()
        raise Unavailable(f"private dockerd did not start: {tail}")

    @classmethod
    def sweep(cls, base: str | None = None) -> list[str]:
        """Stop and remove private engines whose owner process is gone (a test run that was
        killed before its stop()); returns their directories."""
        removed = []
        for path in glob.glob(os.path.join(base or tempfile.gettempdir(), "corral.dockerd.*")):
            try:
                with open(os.path.join(path, "owner")) as f:
                    owner, name = f.read().split()
            except (OSError, ValueError):
                continue  # starting right now, or not ours
            if _creator_alive(owner):
                continue
            stale = cls.__new__(cls)
            stale.dir, stale.name, stale.proc, stale._log = path, name, None, None
            stale.url = "unix://" + os.path.join(path, "docker.sock")
            stale._kill_everything()
            # Its containers' temporary directories, named in their labels on disk.
            for config in glob.glob(os.path.join(path, "data", "containers", "*",
                                                 "config.v2.json")):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    with open(config) as f:
                        labels = (json.load(f).get("Config") or {}).get("Labels") or {}
                    for label in (LABEL_WORKSPACE, LABEL_FDS):
                        _remove_workspace(labels.get(label))
            stale._unmount_all()
            stale._remove_cgroups()
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def _wait_ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            if os.path.exists(self.socket):
                with contextlib.suppress(OSError):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.settimeout(2)
                        s.connect(self.socket)
                        s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                        if b"OK" in s.recv(4096):
                            return True
            time.sleep(0.1)
        return False

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            with open(os.path.join(self.dir, "dockerd.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        return ""

    def _end_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal_mod.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal_mod.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Remove every container, stop dockerd (and its containerd), remove its data."""
        with _clients_lock:
            _clients.pop(self.url, None)
        with _image_lock:
            _images.pop(self.url, None)
        DockerSandbox._swept.discard(self.url)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                api = _sdk().APIClient(base_url=self.url, version=API_VERSION, timeout=30)
                for info in api.containers(all=True):
                    api.remove_container(info["Id"], force=True, v=True)
                    for label in (LABEL_WORKSPACE, LABEL_FDS):
                        _remove_workspace((info.get("Labels") or {}).get(label))
        self._end_process()
        self._unmount_all()
        self._remove_cgroups()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_everything(self) -> None:
        """SIGKILL what an engine whose owner died left running: dockerd, containerd and
        the shims (their command lines name its containerd namespace), then every process
        in its containers' cgroups."""
        for _ in range(50):
            victims = set()
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                    if self.name.encode() in cmdline or self.dir.encode() in cmdline:
                        victims.add(int(pid))
            for procs in glob.glob(f"/sys/fs/cgroup/*/{self.name}/**/cgroup.procs",
                                   recursive=True):
                with contextlib.suppress(OSError, ValueError):
                    with open(procs) as f:
                        victims.update(int(x) for x in f.read().split())
            if not victims:
                return
            for pid in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal_mod.SIGKILL)
            time.sleep(0.1)

    def _remove_cgroups(self) -> None:
        """rmdir the (by now empty) cgroup parent its containers lived under."""
        if not self.name:
            return
        for parent in sorted(glob.glob(f"/sys/fs/cgroup/*/{self.name}")
                             + glob.glob(f"/sys/fs/cgroup/{self.name}"), reverse=True):
            for dirpath, _dirs, _files in sorted(os.walk(parent), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def _unmount_all(self) -> None:
        """Detach mounts the engine left under its directories (overlay, shm, netns)."""
        with contextlib.suppress(OSError):
            with open("/proc/self/mountinfo") as f:
                targets = [line.split()[4] for line in f]
            for target in sorted((t for t in targets if t.startswith(self.dir + "/")),
                                 key=len, reverse=True):
                subprocess.run(["umount", "-l", target], capture_output=True)

    def __enter__(self) -> PrivateEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # a quick manual check: python -m corral.sandbox.backends.docker
    result = run(sys.argv[1:] or ["id"])
    sys.stdout.buffer.write(result.stdout + result.stderr)
    sys.exit(result.exit_status)
