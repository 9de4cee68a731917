"""DockerSandbox: one container that idles while commands join it with exec (the same
init/exec model as the native backend); adopted by a restarted daemon (live restore:
the container outlives its client, its commands' attach streams do not).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import logging
import os
import re
import shutil
import signal as signal_mod
import socket
import sys
import tempfile
import threading
import time
import weakref
from urllib.parse import quote

from ... import ids, seccomp, workspace_fs
from ...errors import (
    CommandNotFound,
    CorralError,
    FailedPrecondition,
    InvalidSpec,
    SandboxSetupError,
    UnsupportedHost,
)
from ...ptys import check_window
from ...spec import SandboxSpec
from ..base import PIPE, CommandClock, ExitReason, SandboxLifecycle
from ..native import PIDFD_SIGNAL_PROCESS_GROUP
from .config import container_config
from .engine import (
    API_VERSION,
    CONSOLE_SIZE_API_VERSION,
    REQUEST_TIMEOUT_S,
    _is_local,
    _sdk,
    client,
    engine_url,
    sizes_consoles,
)
from .fds import _frame_payloads, _PassedFds, _StartGate, _wrapper_state, wrap
from .image import base_image
from .images import _config as image_config_of
from .images import engine_image
from .process import DockerProcess, _is_fd
from .sweep import (
    KEPT_FILE,
    LABEL,
    LABEL_FDS,
    LABEL_RUNTIME,
    LABEL_WORKSPACE,
    _remove_runtime,
    runtime_base,
    sweep,
)

log = logging.getLogger("corral.docker")


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
        #: The engine's creation time of the container (with its id, what live restore
        #: checks a container against: kept_record()).
        self.created = ""
        self.init_pid: int | None = None
        #: Its directory on the host (the daemon's command journals; the `kept` mark).
        self.runtime_dir: str | None = None
        self._ids = None
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
        #: The seccomp profile the container runs under (its digest is the policy's).
        self._seccomp: seccomp.SeccompProfile | None = None
        #: spec.image's config as the engine holds it (Entrypoint, Cmd, Env...).
        self._image_config: dict = {}

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
        if self.spec.image:  # loaded or pulled into the engine unless it holds it
            image, self._image_config = engine_image(self.api, self.url, self.spec.image)
        else:
            image = base_image(self.url)
        self._move("starting")
        self.status_fd, self._status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if self.spec.uid_base is None:  # its own host ids, as a native sandbox's
                self._ids = ids.allocate(self.id) if os.geteuid() == 0 else ids.IdRange(
                    os.getuid(), 1)
                self.spec = self.spec.with_ids(self._ids.base, self._ids.count)
            self._setup_workspace()
            self._fds_dir = tempfile.mkdtemp(prefix=f"corral.{self.id}.fds.")
            if os.geteuid() == 0:
                os.chown(self._fds_dir, self.spec.uid_base, self.spec.uid_base)
            os.chmod(self._fds_dir, 0o700)
            self.runtime_dir = os.path.join(runtime_base(), self.id)
            os.makedirs(self.runtime_dir, mode=0o700)
            config = container_config(self.api, self.spec, image, self.id, self.workspace,
                                      self._own_workspace, self._fds_dir,
                                      on_image=bool(self.spec.image))
            config["labels"][LABEL_RUNTIME] = self.runtime_dir
            try:
                self.container_id = self.api.create_container(**config)["Id"]
                self.api.start(self.container_id)
                info = self.api.inspect_container(self.container_id)
            except docker.errors.APIError as exc:
                message = exc.explanation or str(exc)
                if exc.status_code == 400 or "invalid" in str(message).lower():
                    raise InvalidSpec("spec", f"the engine refused it: {message}") from None
                raise CorralError(f"docker: creating sandbox {self.id}: {message}") from None
            self.created = info.get("Created", "")
            self.init_pid = int(info["State"].get("Pid") or 0) or None
            if self._ids is not None and self.init_pid:  # taken while the container lives
                self._ids.note_init(self.init_pid)
            self._own_by_container()
            self._seccomp = seccomp.load_profile(self.spec.profile)
            self._move("running")
        except BaseException:
            self._cleanup()
            raise

    @property
    def seccomp_digest(self) -> str:
        return self._seccomp.digest

    @property
    def image_config(self) -> dict:
        """The image's config (Env, Cmd, WorkingDir...), {} without spec.image."""
        return self._image_config

    def image_command(self, args: list[str]):
        """The command `docker run` would run on this sandbox's image with these args,
        resolved as the native backend does (sandbox/images/runconfig.py): the User's name
        is looked up in the container's own /etc (its root, on a local engine).

        Raises:
            InvalidSpec: no command, or a User the image's /etc does not name.
            UnsupportedHost: the engine is remote and the image names a User.
        """
        from ...images import runconfig

        if not (self._image_config.get("User") or ""):
            return runconfig.resolve(self._image_config, args, self.spec.env, -1)
        if not (self.local and self.init_pid):
            raise UnsupportedHost(f"the image's User {self._image_config['User']!r} is "
                                  f"resolved in the container's /etc, which a remote engine "
                                  f"({self.url}) does not show")
        return runconfig.resolve_in(self._image_config, args, self.spec.env, self.init_pid)

    def _cleanup(self, *, remove_later: bool = False) -> None:
        """Remove the container (killing everything in it) and its temporary workspace;
        all of it before returning (remove_later changes nothing: the engine's removal is
        what kills)."""
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
        if self._ids is not None:
            self._ids.release()
        if self._fds_dir is not None:
            shutil.rmtree(self._fds_dir, ignore_errors=True)
            self._fds_dir = None
        if self.runtime_dir is not None:
            _remove_runtime(self.runtime_dir)
            self.runtime_dir = None
        for proc in list(self._procs):
            if proc._eof or not proc._pumping:  # a pump in progress closes its own
                proc._close()
        with self._status_lock:
            for fd in (self.status_fd, self._status_w):
                if fd >= 0:
                    os.close(fd)
            self.status_fd = self._status_w = -1
        self._settle_destroyed()

    # -- live restore ---------------------------------------------------------------------

    def kept_record(self, store: str) -> dict:
        """Live restore keeps this sandbox in the restore.db at store: mark its runtime
        directory so (every sweep, of any process, then leaves the container while the
        store has its row: sweep.kept_by_store) and return what adopt() checks the
        container against (the engine, the container's id and creation time)."""
        path = os.path.join(self.runtime_dir, KEPT_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(store)
        os.replace(path + ".tmp", path)
        return {"url": self.url, "container_id": self.container_id, "created": self.created}

    @classmethod
    def adopt(cls, spec: SandboxSpec, name: str, record: dict, *,
              paused: bool = False) -> DockerSandbox:
        """The running container that a process now gone started for sandbox `name` (its
        spec with host ids fixed), taken over by this one (live restore). New commands,
        pause, resume and destroy work as for a sandbox this process started; the
        commands the old process ran are lost (adopt_command).

        Args:
            record: kept_record()'s answer when the sandbox was kept.
            paused: whether the daemon had it paused (the engine is made to agree).

        Raises:
            FailedPrecondition: the container is gone, has stopped, or is not the one
                recorded (another id, creation time or sandbox label).
            Unavailable: no engine answers at the recorded URL.
        """
        sb = cls(spec, docker_host=record.get("url") or None, name=name)
        sb.api = client(sb.url)
        info = sb._inspect_recorded(str(record.get("container_id") or ""),
                                    str(record.get("created") or ""))
        labels = info["Config"].get("Labels") or {}
        sb.container_id, sb.created = info["Id"], info["Created"]
        sb.init_pid = int(info["State"].get("Pid") or 0) or None
        sb.runtime_dir = labels.get(LABEL_RUNTIME)
        if not sb.runtime_dir or not os.path.isdir(sb.runtime_dir):
            raise FailedPrecondition(f"sandbox {name}: its runtime directory "
                                     f"{sb.runtime_dir!r} is gone")
        sb._fds_dir = labels.get(LABEL_FDS)
        sb.workspace = labels.get(LABEL_WORKSPACE) or spec.workspace
        sb._own_workspace = bool(labels.get(LABEL_WORKSPACE))
        sb._own_by_container()
        slot = os.path.join(ids.state_dir(), str(spec.uid_base))
        if os.geteuid() == 0 and os.path.exists(slot):  # its range, released at destroy
            sb._ids = ids.IdRange(spec.uid_base, spec.uid_count, slot)
        if spec.image:  # Env, User, WorkingDir... of the image it runs
            sb._image_config = image_config_of(sb.api, sb.url, info["Config"]["Image"])
        sb._seccomp = seccomp.load_profile(spec.profile)
        if bool(info["State"].get("Paused")) != paused:  # a pause or resume cut short
            sb._engine_call("pause" if paused else "unpause",
                            sb.api.pause if paused else sb.api.unpause)
        sb.status_fd, sb._status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        sb.state = "running"
        return sb

    def _own_by_container(self) -> None:
        """Make the container's init (a local engine's) the owner of the workspace made
        for it: a workspace sweep of any process keeps it while the container runs, as
        the container outlives the process that made it (live restore)."""
        if self._own_workspace and workspace_fs.is_managed(self.workspace):
            workspace_fs._claim(self.id, self.init_pid if self.local else None)

    def _inspect_recorded(self, container_id: str, created: str) -> dict:
        """The engine's view of the recorded container, checked to be this sandbox's.

        Raises:
            FailedPrecondition: gone, stopped, or not the recorded one.
        """
        docker = _sdk()
        if not container_id:
            raise FailedPrecondition(f"sandbox {self.id}: no container was recorded")
        try:
            info = self.api.inspect_container(container_id)
        except docker.errors.NotFound:
            raise FailedPrecondition(f"sandbox {self.id}: its container {container_id[:12]} "
                                     f"is gone") from None
        except docker.errors.APIError as exc:
            raise CorralError(f"docker: inspecting sandbox {self.id}: "
                              f"{exc.explanation or exc}") from None
        label = (info["Config"].get("Labels") or {}).get(LABEL)
        if label != self.id or info.get("Created") != created:
            raise FailedPrecondition(
                f"sandbox {self.id}: container {container_id[:12]} is not the one recorded "
                f"(sandbox label {label!r}, created {info.get('Created')!r}, not {created!r})")
        state = info.get("State") or {}
        if not state.get("Running"):
            raise FailedPrecondition(
                f"sandbox {self.id}: its container has stopped ({state.get('Status')}, exit "
                f"code {state.get('ExitCode')})")
        return info

    def adopt_command(self, pid: int, ns_pid: int, argv: list[str],
                      timeout_s: float | None = None, pty_fd: int = -1) -> LostCommand:
        """A command the process that started this sandbox ran (live restore): lost. Its
        stdin, stdout and stderr were that process's exec connection, which the engine
        does not attach again; one still running (pid: its host pid, 0 when gone) is
        killed with its process group, and it ends now (reason daemon-shutdown). pty_fd
        (a native terminal's master, for resize) is closed: none is used here."""
        if pty_fd >= 0:
            os.close(pty_fd)
        if pid and self.local:
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                try:
                    signal_mod.pidfd_send_signal(pidfd, signal_mod.SIGKILL, None,
                                                 PIDFD_SIGNAL_PROCESS_GROUP)
                except OSError:  # a kernel without group pidfd signals (before 6.9)
                    signal_mod.pidfd_send_signal(pidfd, signal_mod.SIGKILL)
                finally:
                    os.close(pidfd)
        return LostCommand(argv, ns_pid)

    @classmethod
    def sweep_engine(cls, url: str) -> list[str]:
        """sweep() of the engine at url, standing for the one this process's first start
        there would make (live restore: right after the kept containers were adopted).
        An engine that does not answer, or fails the sweep, is left for that first start
        (the daemon's start does not fail over it)."""
        try:
            removed = sweep(url)
        except Exception as exc:  # the SDK raises requests/urllib3/API errors alike
            log.warning("docker: sweeping the engine at %s: %s", url, exc)
            return []
        cls._swept.add(url)
        return removed

    def _freeze(self) -> None:
        """The engine's pause (its cgroup freezer)."""
        self._engine_call("pause", self.api.pause)

    def _thaw(self) -> None:
        self._engine_call("unpause", self.api.unpause)

    def _engine_call(self, what: str, call) -> None:
        try:
            call(self.container_id)
        except Exception as exc:  # the SDK raises requests/urllib3/API errors alike
            message = getattr(exc, "explanation", None) or str(exc)
            raise CorralError(f"docker: {what} of sandbox {self.id}: {message}") from None

    def _running_processes(self) -> list:
        return [proc for proc in list(self._procs) if proc.returncode is None]

    # -- commands -------------------------------------------------------------------------

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str = "/workspace", stdin: int | None = PIPE, stdout: int | None = PIPE,
             stderr: int | None = PIPE, timeout_s: float | None = None,
             pass_fds: dict[int, int] | None = None,
             tty: tuple[int, int] | None = None,
             user: tuple[int, int] | None = None) -> DockerProcess:
        """Run argv in the sandbox; returns the running DockerProcess.

        Args:
            env: extra variables on top of the spec's environment.
            stdin, stdout, stderr: PIPE, DEVNULL/None, or an open descriptor. Descriptors do
                not cross to an engine: a relay thread copies between them and the exec's
                connection (stdout and stderr must then both be descriptors or DEVNULL).
            timeout_s: wall-clock limit, defaults to the spec's.
            user: (uid, gid) to run as (an image's User, image_command()); default the
                sandbox's own ids.
            tty: (rows, cols): run the command on a terminal of the engine's (a Tty exec:
                its stdin, stdout, stderr and controlling terminal; stdin/stdout/stderr
                are ignored). Process.stdin and .stdout are the raw stream, .stderr is
                None, and Process.resize() changes the window.

        Raises:
            CommandNotFound: argv[0] does not exist or cannot be executed in the sandbox.
            CorralError: the engine refused the exec.
            InvalidSpec: rows or cols out of range (1..10,000).
        """
        if tty is not None:
            check_window(*tty)
            stdin, stdout, stderr = PIPE, PIPE, None  # the terminal is all three
        if self.state != "running":
            raise CorralError(f"sandbox {self.id} is {self.state}; cannot exec")
        if not argv:
            raise InvalidSpec("argv", "the command is empty")
        relay = any(_is_fd(h) for h in (stdout, stderr))
        if relay and PIPE in (stdout, stderr):
            raise InvalidSpec("stdout", "give descriptors (or DEVNULL) for both outputs, or "
                                        "PIPE for both")
        environment = self.spec.environment()
        for key, value in (env or {}).items():
            environment = [e for e in environment if not e.startswith(key + "=")]
            environment.append(f"{key}={value}")
        passed = gate = None
        try:
            passed = _PassedFds(self, pass_fds) if pass_fds else None
            # an engine that cannot size the terminal at start: the command waits for it
            gate = _StartGate(self) if tty and not sizes_consoles(self.api) else None
            steps = [held.step() for held in (gate, passed) if held is not None]
            exec_id = self._create_exec(wrap(list(argv), steps) if steps else list(argv),
                                        environment, cwd, stdin == PIPE or _is_fd(stdin),
                                        tty is not None, user)
            oom_before = self._oom_kills()
            sock, leftover = self._start_exec(exec_id, tty, console=gate is None)
        except BaseException:
            for held in (passed, gate):
                if held is not None:
                    held.close()
            raise
        keep = (stdout == PIPE or _is_fd(stdout), stderr == PIPE or _is_fd(stderr))
        self._procs.add(proc := DockerProcess(self, exec_id, sock, leftover, list(argv),
                             timeout_s if timeout_s is not None else self.spec.timeout_s,
                             oom_before, stdin == PIPE or _is_fd(stdin), keep,
                             tty=tty is not None))
        if passed:
            proc._on_finish.append(passed.stop)
            passed.start()
        try:
            self._check_started(proc, cwd, wrapped=bool(steps),
                                on_running=gate and (lambda: self._size_then_start(proc, gate,
                                                                                   tty)))
        finally:
            if gate:  # (unopened: the wrapper's read ends and the command runs unsized)
                gate.close()
        if tty is not None:
            proc.watch_exit()
        elif relay or _is_fd(stdin):
            proc._relay(stdin if _is_fd(stdin) else None,
                        stdout if _is_fd(stdout) else None,
                        stderr if _is_fd(stderr) else None, self._notify_exit)
        return proc

    def _create_exec(self, command: list[str], environment: list[str], cwd: str,
                     stdin: bool, tty: bool, user: tuple[int, int] | None = None) -> str:
        """The engine's exec instance for command (as the sandbox's user, or `user`); its
        id.

        Raises:
            CorralError: the engine refused it.
        """
        uid, gid = user if user is not None else (self.spec.uid_base, self.spec.uid_base)
        try:
            return self.api.exec_create(
                self.container_id, command, stdout=True, stderr=True, stdin=stdin, tty=tty,
                user=f"{uid}:{gid}", environment=environment, workdir=cwd)["Id"]
        except _sdk().errors.APIError as exc:
            raise CorralError(f"docker: exec in {self.id}: {exc.explanation or exc}") from None

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

    @staticmethod
    def _size_then_start(proc: DockerProcess, gate: _StartGate, tty: tuple[int, int]) -> None:
        """Set a gated tty command's window, then let it start (a refused resize leaves
        the engine's own size: the command is not held back for it)."""
        with contextlib.suppress(CorralError):
            proc.resize(*tty)
        gate.open()

    def _check_started(self, proc: DockerProcess, cwd: str, wrapped: bool = False,
                       on_running=None) -> None:
        """Wait until the engine has started the command (learning its pid), or tell
        CommandNotFound when the runtime could not execute it. on_running is called once
        the wrapper (or the command) runs."""
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
                # Through the wrapper, a running pid is the runtime's init, then the shell,
                # not yet the command: wait for its exec (or its exit, 127 when argv[0] is
                # missing). on_running: once the shell runs (its terminal exists then).
                state = _wrapper_state(pid) if wrapped and self.local else "exec'd"
                if on_running is not None and state in ("wrapper", "exec'd"):
                    on_running()
                    on_running = None
                    continue
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

    def _start_exec(self, exec_id: str, tty: tuple[int, int] | None = None,
                    console: bool = False) -> tuple[socket.socket, bytes]:
        """Start an exec and take over its connection; returns it and any bytes read past
        the response headers (output that arrived with them). console: the engine sets
        the tty's window (rows, cols) at start (API >= 1.42)."""
        start: dict = {"Detach": False, "Tty": tty is not None}
        version = API_VERSION
        if tty is not None and console:
            start["ConsoleSize"], version = list(tty), CONSOLE_SIZE_API_VERSION
        body = json.dumps(start).encode()
        path = f"/v{version}/exec/{quote(exec_id)}/start"
        request = (f"POST {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: corral\r\n"
                   f"Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        sock = self._connect()
        try:
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                # a terminal's bytes go to whoever reads the connection's files, so none
                # may be read here with the headers: a tty's are read one byte at a time
                chunk = sock.recv(1 if tty is not None else 65536)
                if not chunk:
                    raise CorralError(f"docker: the engine closed the exec connection of {self.id}")
                head += chunk
            header, _, rest = head.partition(b"\r\n\r\n")
            status = header.split(b"\r\n", 1)[0].split()
            if len(status) < 2 or status[1] not in (b"101", b"200"):
                if not rest:  # (a tty's headers were read alone) the engine's message
                    sock.settimeout(REQUEST_TIMEOUT_S)
                    with contextlib.suppress(OSError):
                        rest = sock.recv(65536)
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
        if self.state not in ("running", "paused") or not self.local:
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


class LostCommand(CommandClock):
    """A command of a sandbox adopted after a restart whose stdio died with the daemon
    that started it (adopt_command): it has ended, killed, with reason daemon-shutdown."""

    has_tty = False
    stdin = stdout = stderr = None
    pid = 0

    def __init__(self, argv: list[str], ns_pid: int = 0):
        self.argv = tuple(argv)
        self.ns_pid = ns_pid
        self._start_clock(None)
        self.reason = ExitReason.DAEMON_SHUTDOWN
        self.returncode = -signal_mod.SIGKILL

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def remaining(self) -> float | None:
        return None

    def send_signal(self, sig: int) -> None:
        pass

    def signal_group(self, sig: int) -> bool:
        return False

    def kill(self) -> None:
        pass

    expire = kill


if __name__ == "__main__":  # a quick manual check: python -m corral.sandbox.backends.docker
    from ..base import run

    result = run(sys.argv[1:] or ["id"], SandboxSpec(backend="docker"))
    sys.stdout.buffer.write(result.stdout + result.stderr)
    sys.exit(result.exit_status)
