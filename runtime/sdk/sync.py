"""corral.Client: the synchronous SDK, typed results over runtime/client.py's connection.

Each operation is a `corral.calls.Call` (shared with corral.AsyncClient); this module only
runs it on a grpc channel: unary calls return the converted answer, streams are iterators
that cancel their call when the caller stops early, and every failure is a typed
`corral.errors.CorralError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from corral.runtime.client import Client as WireClient
from corral.runtime.client import SessionStream

from . import calls, types
from .errors import CorralError, translated, translated_iter


class SandboxHandle:
    """One sandbox bound to its client: `sb.run([...])` is `client.run(sb.id, [...])`.

    The same class serves Client and AsyncClient: each method returns what the client's
    method does (a value, or with AsyncClient an awaitable / async iterator)."""

    def __init__(self, client, info: types.Sandbox):
        self.client = client
        self.info = info
        self.id = info.id

    def __repr__(self) -> str:
        return f"<sandbox {self.id}>"

    def refresh(self):
        """The sandbox as the daemon reports it now (`info` keeps what it was at the start)."""
        return self.client.get_sandbox(self.id)

    def exec(self, argv: list[str], **options):
        return self.client.exec(self.id, argv, **options)

    def run(self, argv: list[str], **options):
        return self.client.run(self.id, argv, **options)

    def read_file(self, path: str, max_bytes: str | int | None = None):
        return self.client.read_file(self.id, path, max_bytes)

    def write_file(self, path: str, content: bytes | str, mode: int = 0o644):
        return self.client.write_file(self.id, path, content, mode)

    def list_files(self, path: str = ""):
        return self.client.list_files(self.id, path)

    def stat(self, path: str):
        return self.client.stat(self.id, path)

    def upload(self, path: str, source, *, mode: int = 0, offset: int = 0):
        return self.client.upload(self.id, path, source, mode=mode, offset=offset)

    def download(self, path: str, dest, *, offset: int = 0, length: int = 0):
        return self.client.download(self.id, path, dest, offset=offset, length=length)

    def put_archive(self, path: str, archive):
        return self.client.put_archive(self.id, path, archive)

    def get_archive(self, path: str, dest):
        return self.client.get_archive(self.id, path, dest)

    def watch_files(self, path: str = ""):
        return self.client.watch_files(self.id, path)

    def pause(self):
        return self.client.pause(self.id)

    def resume(self):
        return self.client.resume(self.id)

    def set_timeout(self, ttl: str | float):
        return self.client.set_timeout(self.id, ttl)

    def snapshot(self, name: str = ""):
        return self.client.snapshot(self.id, name)

    def destroy(self):
        return self.client.destroy_sandbox(self.id)


class Session:
    """An open agent session: iterate its typed events; send(), interrupt(), close().

    Opening waits for the daemon's SessionOpened, so `id` and `sandbox_id` are set (and a
    refused start has raised) by the time the caller has it. Leaving `with` closes the
    session unless it has exited or was detached.
    """

    def __init__(self, stream: SessionStream):
        self._stream = stream
        self._events = translated_iter(stream)
        self.ended = False
        opened = self._next()
        if not isinstance(opened, types.SessionOpened):
            raise CorralError(grpc.StatusCode.UNKNOWN, f"the session stream began with {opened!r}")
        self.id, self.sandbox_id = opened.session_id, opened.sandbox_id

    def _next(self):
        for answer in self._events:
            event = types.session_event(answer)
            if event is not None:
                return event
        self.ended = True
        return None

    @property
    def last_seq(self) -> int:
        """The newest entry received: resume_session(id, after_seq=last_seq) goes on."""
        return self._stream.last_seq

    def __iter__(self) -> Iterator[types.SessionEvent]:
        while (event := self._next()) is not None:
            if isinstance(event, types.SessionExited):
                self.ended = True
            yield event

    def send(self, text: str) -> None:
        """Steer: text reaches the running turn as input."""
        self._stream.send_input(text)

    def interrupt(self) -> None:
        """End the current turn (the agent gets INTERRUPT)."""
        self._stream.interrupt()

    def close(self, detach: bool = False) -> None:
        """End the session (detach=True: the deep tasks it delegated run on)."""
        self._stream.close_session(detach)

    def detach(self) -> None:
        """Drop this connection; the session runs on (resume_session comes back)."""
        self.ended = True
        self._stream.detach()

    def wait(self) -> types.SessionExited | None:
        """Read to the end; the exit (None when the stream ended without one)."""
        exited = None
        for event in self:
            if isinstance(event, types.SessionExited):
                exited = event
        return exited

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        if not self.ended:
            with contextlib.suppress(CorralError):
                self.close()
                for _ in self:
                    pass


class Client(contextlib.AbstractContextManager):
    """A connection to one Corral daemon, with typed results.

        with corral.Client() as client:                  # $CORRAL_SOCKET or the default
            with client.sandbox(memory="256M", ttl="10m") as sb:
                print(sb.run(["echo", "hi"]).stdout)

    Connection: a unix socket (socket, else $CORRAL_SOCKET, else the daemon's default), or
    target="HOST:PORT" with a token (else $CORRAL_TOKEN) and, for TLS, root_certificates
    (PEM bytes of the daemon's CA) and client_cert/client_key for mTLS.

    Raises:
        Unavailable: no daemon socket at the path.
    """

    def __init__(self, socket: str | None = None, *, target: str | None = None,
                 token: str | None = None, tenant: str | None = None,
                 root_certificates: bytes | None = None, client_cert: bytes | None = None,
                 client_key: bytes | None = None):
        with translated():
            self.wire = WireClient.connect(socket, target, token, tenant, root_certificates,
                                           client_cert, client_key)

    def close(self) -> None:
        self.wire.close()

    def __exit__(self, *exc) -> None:
        self.close()

    def _method(self, call: calls.Call):
        return getattr(getattr(self.wire, call.service), call.method)

    def _run(self, call: calls.Call):
        with translated():
            answer = self._method(call)(call.request, metadata=self.wire.metadata,
                                        timeout=call.timeout)
        return call.convert(answer)

    def _stream(self, call: calls.Call) -> Iterator:
        answers = self._method(call)(call.request, metadata=self.wire.metadata,
                                     timeout=call.timeout)
        try:
            for answer in translated_iter(answers):
                item = call.convert(answer)
                if call.many:
                    yield from item
                elif item is not None:
                    yield item
        finally:
            answers.cancel()

    def _every(self, paged: calls.Paged) -> list:
        found, call = [], paged.first
        while call is not None:
            answer = self._run(call)
            found.extend(paged.convert(item) for item in getattr(answer, paged.items))
            call = paged.next_call(answer)
        return found

    # -- sandboxes --------------------------------------------------------------------------

    def create_sandbox(self, *, labels: Mapping[str, str] | None = None, request_id: str = "",
                       **settings: Any) -> SandboxHandle:
        """A new sandbox. settings: memory="256M", tmp="64M", ttl="30m", cpus=0.5,
        pids_max, image, snapshot, env, hostname, allow_net, command_timeout, profile,
        backend, workspace_dir, workspace_cow, secrets=[{"name": N, "hosts": [HOST]}]
        (values from the daemon's secret store). request_id: a retry with it returns the
        same sandbox."""
        return SandboxHandle(self, self._run(calls.create_sandbox(labels, request_id,
                                                                  settings)))

    @contextlib.contextmanager
    def sandbox(self, **settings: Any) -> Iterator[SandboxHandle]:
        """create_sandbox as a context: the sandbox is destroyed on leaving, exception or
        not (a failing destroy never hides the exception that left the block)."""
        sb = self.create_sandbox(**settings)
        try:
            yield sb
        except BaseException:
            with contextlib.suppress(CorralError):
                self.destroy_sandbox(sb.id)
            raise
        self.destroy_sandbox(sb.id)

    def get_sandbox(self, sandbox_id: str) -> types.Sandbox:
        return self._run(calls.get_sandbox(sandbox_id))

    def list_sandboxes(self, selector: str = "", state: str | None = None
                       ) -> list[types.Sandbox]:
        """Every sandbox of the caller's matching a label selector ("team=ml,!tmp") and
        state ("running", "paused", "destroyed"; None: the running ones)."""
        return self._every(calls.list_sandboxes(selector, state))

    def destroy_sandbox(self, sandbox_id: str) -> bool:
        """Destroy it; True when it was already destroyed (not an error)."""
        return self._run(calls.destroy_sandbox(sandbox_id))

    def pause(self, sandbox_id: str) -> types.Sandbox:
        return self._run(calls.pause(sandbox_id))

    def resume(self, sandbox_id: str) -> types.Sandbox:
        return self._run(calls.resume(sandbox_id))

    def set_timeout(self, sandbox_id: str, ttl: str | float) -> types.Sandbox:
        """Destroy the sandbox ttl ("30m", seconds) from now."""
        return self._run(calls.set_timeout(sandbox_id, ttl))

    def exec(self, sandbox_id: str, argv: list[str], *, env: Mapping[str, str] | None = None,
             cwd: str = "", stdin: bytes = b"", timeout: str | float | None = None,
             allow_loss: bool = False) -> Iterator[types.ExecEvent]:
        """Run argv; yields ExecStarted, ExecOutput (bytes exactly as written) and
        ExecExited. Stopping early cancels the stream (the command runs on)."""
        return self._stream(calls.exec_command(sandbox_id, argv, env, cwd, stdin, timeout,
                                               allow_loss))

    def run(self, sandbox_id: str, argv: list[str], **options: Any) -> types.ExecResult:
        """exec to the end: the whole output and how the command ended."""
        collected = types.ExecCollector()
        for event in self.exec(sandbox_id, argv, **options):
            collected.add(event)
        return collected.result()

    def read_file(self, sandbox_id: str, path: str, max_bytes: str | int | None = None
                  ) -> bytes:
        """A file's bytes (at most max_bytes, "4M" at most; None: 4 MiB)."""
        return self._run(calls.read_file(sandbox_id, path, max_bytes))

    def write_file(self, sandbox_id: str, path: str, content: bytes | str,
                   mode: int = 0o644) -> int:
        """Write a file (str is written as UTF-8); returns its size."""
        return self._run(calls.write_file(sandbox_id, path, content, mode))

    def list_files(self, sandbox_id: str, path: str = "") -> list[types.FileEntry]:
        return self._run(calls.list_files(sandbox_id, path))

    def stat(self, sandbox_id: str, path: str) -> types.FileStat:
        """One path's stat (a symlink is reported, never followed)."""
        return self._run(calls.stat_file(sandbox_id, path))

    def upload(self, sandbox_id: str, path: str, source: calls.Source, *, mode: int = 0,
               offset: int = 0) -> types.Transfer:
        """Stream source (bytes, a local path, a binary file object) into path, any size,
        in chunks. offset N > 0 resumes: the sandbox file keeps its first N bytes and the
        source's bytes from N follow. The sha256 of the result is checked (DATA_LOSS)."""
        with calls.Upload(sandbox_id, path, source, mode, offset) as upload:
            return self._run(upload.call())

    def download(self, sandbox_id: str, path: str, dest: calls.Dest, *, offset: int = 0,
                 length: int = 0) -> types.Transfer:
        """Stream path, any size, to dest (a local path, holes kept; or a writable binary
        file object). offset N > 0 resumes into the local file dest from byte N; length:
        bytes at most (0: to the end). The sha256 of the result is checked (DATA_LOSS)."""
        with calls.Download(sandbox_id, path, dest, offset, length) as download:
            for answer in self._stream(download.call()):
                download.take(answer)
            return download.result()

    def put_archive(self, sandbox_id: str, path: str, archive: calls.Source
                    ) -> types.ArchiveResult:
        """Extract a tar stream (bytes, a local .tar path or a file object) beneath the
        existing directory path, confined to the workspace."""
        with calls.PutArchive(sandbox_id, path, archive) as put:
            return self._run(put.call())

    def get_archive(self, sandbox_id: str, path: str, dest: calls.Dest) -> types.FileStat:
        """Write a tar stream of path (a directory with everything below it, or a file) to
        dest (a local path or a writable binary file object); returns path's stat."""
        with calls.GetArchive(sandbox_id, path, dest) as get:
            for answer in self._stream(get.call()):
                get.take(answer)
            return get.stat

    def watch_files(self, sandbox_id: str, path: str = "") -> Iterator[types.FileEvent]:
        """Changes under path (empty: the workspace) as FileEvent, first "watching", until
        the caller stops iterating (which cancels the watch)."""
        return self._stream(calls.watch_files(sandbox_id, path))

    # -- snapshots and forks ----------------------------------------------------------------

    def snapshot(self, sandbox_id: str, name: str = "") -> types.Snapshot:
        """Capture the sandbox's writable state (it is frozen for the copy, then runs on)."""
        return self._run(calls.snapshot(sandbox_id, name))

    def fork(self, snapshot: str, **settings: Any) -> SandboxHandle:
        """A new sandbox started from a snapshot (id or name); settings as create_sandbox."""
        return self.create_sandbox(snapshot=snapshot, **settings)

    def list_snapshots(self) -> list[types.Snapshot]:
        return self._run(calls.list_snapshots())

    def remove_snapshot(self, snapshot: str) -> None:
        self._run(calls.remove_snapshot(snapshot))

    # -- sessions ---------------------------------------------------------------------------

    def open_session(self, argv: list[str], *, sandbox_id: str = "", input: str = "",
                     env: Mapping[str, str] | None = None,
                     labels: Mapping[str, str] | None = None, request_id: str = "",
                     delegations_from: str = "", **settings: Any) -> Session:
        """Start an agent session in sandbox_id, or in a new sandbox of settings (as
        create_sandbox; destroyed with the session). delegations_from: a gone session
        whose deep tasks this one takes over."""
        request = calls.session_start(argv, sandbox_id, input, env, labels, request_id,
                                      delegations_from, settings)
        return Session(SessionStream(self.wire.sessions, request, self.wire.metadata))

    def resume_session(self, session_id: str, after_seq: int = 0,
                       watch_only: bool = False) -> Session:
        """Attach to a running session, replaying the entries after after_seq."""
        request = calls.session_resume(session_id, after_seq, watch_only)
        return Session(SessionStream(self.wire.sessions, request, self.wire.metadata))

    def get_session(self, session_id: str) -> types.SessionInfo:
        return self._run(calls.get_session(session_id))

    def list_sessions(self, selector: str = "", state: str | None = None
                      ) -> list[types.SessionInfo]:
        """Sessions matching a label selector and state ("running", "exited"; None: all)."""
        return self._every(calls.list_sessions(selector, state))

    # -- deep tasks -------------------------------------------------------------------------

    def submit_task(self, argv: list[str], **options: Any) -> types.Task:
        """Submit a deep task. options: resources={"cpu": 0.5}, selector, priority,
        retries, max_runtime="1h", files={name: bytes}, labels, request_id (a retry with it
        returns the same task), parent_session; any other is a setting of the task's
        sandbox (as create_sandbox: memory="512M", image=..., snapshot=ID_OR_NAME,
        secrets=[{"name": N, "hosts": [HOST]}])."""
        return self._run(calls.submit_task(argv, options))

    def get_task(self, task_id: str) -> types.Task:
        return self._run(calls.get_task(task_id))

    def list_tasks(self, state: str | None = None, selector: str = "",
                   parent_session: str = "", limit: int = 0) -> list[types.Task]:
        """The newest tasks (at most limit; 0: 1000) in a state ("running", ...), matching
        a label selector, linked to parent_session."""
        return self._run(calls.list_tasks(state, selector, parent_session, limit))

    def cancel_task(self, task_id: str) -> types.Task:
        return self._run(calls.cancel_task(task_id))

    def watch_task(self, task_id: str) -> Iterator[types.Task | types.TaskLog]:
        """The task as it changes (Task) and its log lines (TaskLog) until it finishes."""
        return self._stream(calls.watch_task(task_id))

    def wait_task(self, task_id: str) -> types.Task:
        """Block until the task has finished; the finished task."""
        for update in self.watch_task(task_id):
            if isinstance(update, types.Task) and update.done:
                return update
        return self.get_task(task_id)

    def task_result(self, task_id: str) -> types.TaskResult:
        return self._run(calls.task_result(task_id))

