"""corral.AsyncClient: the SDK on grpc.aio, for platforms that run on asyncio.

The same operations as corral.Client (each a `corral.calls.Call`), awaited; streams are
async iterators; sessions are AsyncSession. Every failure is a typed CorralError.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import grpc.aio

from corral.runtime.client import CHANNEL_OPTIONS, Endpoint, service_stub
from corral.v1 import sandbox_pb2, session_pb2, snapshot_pb2, task_pb2

from . import calls, types
from .errors import CorralError, translated, translated_aiter, typed
from .sync import SandboxHandle


class AsyncSession:
    """An open agent session on asyncio: `async for event in session`, and await send(),
    interrupt(), close(). Made by AsyncClient.open_session once the daemon has opened it."""

    def __init__(self, call):
        self._call = call
        self.id = self.sandbox_id = ""
        self.last_seq = 0
        self.ended = False

    async def _opened(self) -> AsyncSession:
        opened = await self._next()
        if not isinstance(opened, types.SessionOpened):
            self._call.cancel()
            raise CorralError(grpc.StatusCode.UNKNOWN,
                              f"the session stream began with {opened!r}")
        self.id, self.sandbox_id = opened.session_id, opened.sandbox_id
        return self

    async def _next(self):
        while not self.ended:
            try:
                answer = await self._call.read()
            except grpc.RpcError as exc:
                self.ended = True
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return None
                raise typed(exc) from None
            if answer is grpc.aio.EOF:
                self.ended = True
                return None
            if answer.WhichOneof("event") == "batch":
                self.last_seq = types.batch_last_seq(answer.batch)
            event = types.session_event(answer)
            if event is not None:
                return event
        return None

    async def __aiter__(self) -> AsyncIterator[types.SessionEvent]:
        while (event := await self._next()) is not None:
            yield event

    async def _write(self, request) -> None:
        try:
            await self._call.write(request)
        except grpc.RpcError as exc:
            raise typed(exc) from None

    async def send(self, text: str) -> None:
        await self._write(calls.session_input(text))

    async def interrupt(self) -> None:
        await self._write(calls.session_interrupt())

    async def close(self, detach: bool = False) -> None:
        await self._write(calls.session_close(detach))

    def detach(self) -> None:
        """Drop this connection; the session runs on."""
        self.ended = True
        self._call.cancel()

    async def wait(self) -> types.SessionExited | None:
        exited = None
        async for event in self:
            if isinstance(event, types.SessionExited):
                exited = event
        return exited

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.ended:
            with contextlib.suppress(CorralError, grpc.aio.UsageError):
                await self.close()
                await self.wait()


class AsyncClient:
    """corral.Client on asyncio (same connection arguments, same methods, awaited).

        async with corral.AsyncClient() as client:
            async with client.sandbox(memory="256M") as sb:
                result = await sb.run(["echo", "hi"])
    """

    def __init__(self, socket: str | None = None, *, target: str | None = None,
                 token: str | None = None, tenant: str | None = None,
                 root_certificates: bytes | None = None, client_cert: bytes | None = None,
                 client_key: bytes | None = None):
        with translated():
            where = Endpoint.resolve(socket, target, token, tenant, root_certificates,
                                     client_cert, client_key)
        if where.credentials is not None:
            self.channel = grpc.aio.secure_channel(where.address, where.credentials,
                                                   options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(where.address, options=CHANNEL_OPTIONS)
        self.metadata = where.metadata
        self.sandboxes = service_stub(self.channel, sandbox_pb2, "Sandboxes")
        self.sessions = service_stub(self.channel, session_pb2, "Sessions")
        self.tasks = service_stub(self.channel, task_pb2, "Tasks")
        self.snapshots = service_stub(self.channel, snapshot_pb2, "Snapshots")

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _method(self, call: calls.Call):
        return getattr(getattr(self, call.service), call.method)

    async def _run(self, call: calls.Call):
        try:
            answer = await self._method(call)(call.request, metadata=self.metadata,
                                              timeout=call.timeout)
        except grpc.RpcError as exc:
            raise typed(exc) from None
        return call.convert(answer)

    async def _stream(self, call: calls.Call) -> AsyncIterator:
        answers = self._method(call)(call.request, metadata=self.metadata,
                                     timeout=call.timeout)
        try:
            async for answer in translated_aiter(answers):
                item = call.convert(answer)
                if call.many:
                    for one in item:
                        yield one
                elif item is not None:
                    yield item
        finally:
            answers.cancel()

    async def _every(self, paged: calls.Paged) -> list:
        found, call = [], paged.first
        while call is not None:
            answer = await self._run(call)
            found.extend(paged.convert(item) for item in getattr(answer, paged.items))
            call = paged.next_call(answer)
        return found

    # -- sandboxes (as Client) --------------------------------------------------------------

    async def create_sandbox(self, *, labels: Mapping[str, str] | None = None,
                             request_id: str = "", **settings: Any) -> SandboxHandle:
        return SandboxHandle(self, await self._run(calls.create_sandbox(labels, request_id,
                                                                        settings)))

    @contextlib.asynccontextmanager
    async def sandbox(self, **settings: Any) -> AsyncIterator[SandboxHandle]:
        """create_sandbox as an async context: destroyed on leaving, exception or not."""
        sb = await self.create_sandbox(**settings)
        try:
            yield sb
        except BaseException:
            with contextlib.suppress(CorralError):
                await self.destroy_sandbox(sb.id)
            raise
        await self.destroy_sandbox(sb.id)

    async def get_sandbox(self, sandbox_id: str) -> types.Sandbox:
        return await self._run(calls.get_sandbox(sandbox_id))

    async def list_sandboxes(self, selector: str = "", state: str | None = None
                             ) -> list[types.Sandbox]:
        return await self._every(calls.list_sandboxes(selector, state))

    async def destroy_sandbox(self, sandbox_id: str) -> bool:
        return await self._run(calls.destroy_sandbox(sandbox_id))

    async def pause(self, sandbox_id: str) -> types.Sandbox:
        return await self._run(calls.pause(sandbox_id))

    async def resume(self, sandbox_id: str) -> types.Sandbox:
        return await self._run(calls.resume(sandbox_id))

    async def set_timeout(self, sandbox_id: str, ttl: str | float) -> types.Sandbox:
        return await self._run(calls.set_timeout(sandbox_id, ttl))

    def exec(self, sandbox_id: str, argv: list[str], *, env: Mapping[str, str] | None = None,
             cwd: str = "", stdin: bytes = b"", timeout: str | float | None = None,
             allow_loss: bool = False) -> AsyncIterator[types.ExecEvent]:
        return self._stream(calls.exec_command(sandbox_id, argv, env, cwd, stdin, timeout,
                                               allow_loss))

    async def run(self, sandbox_id: str, argv: list[str], **options: Any) -> types.ExecResult:
        collected = types.ExecCollector()
        async for event in self.exec(sandbox_id, argv, **options):
            collected.add(event)
        return collected.result()

    async def read_file(self, sandbox_id: str, path: str, max_bytes: str | int | None = None
                        ) -> bytes:
        return await self._run(calls.read_file(sandbox_id, path, max_bytes))

    async def write_file(self, sandbox_id: str, path: str, content: bytes | str,
                         mode: int = 0o644) -> int:
        return await self._run(calls.write_file(sandbox_id, path, content, mode))

    async def list_files(self, sandbox_id: str, path: str = "") -> list[types.FileEntry]:
        return await self._run(calls.list_files(sandbox_id, path))

    async def stat(self, sandbox_id: str, path: str) -> types.FileStat:
        return await self._run(calls.stat_file(sandbox_id, path))

    async def upload(self, sandbox_id: str, path: str, source: calls.Source, *,
                     mode: int = 0, offset: int = 0) -> types.Transfer:
        """As Client.upload (the source is read between chunks, on the event loop)."""
        with calls.Upload(sandbox_id, path, source, mode, offset) as upload:
            return await self._run(upload.call())

    async def download(self, sandbox_id: str, path: str, dest: calls.Dest, *,
                       offset: int = 0, length: int = 0) -> types.Transfer:
        """As Client.download."""
        with calls.Download(sandbox_id, path, dest, offset, length) as download:
            async for answer in self._stream(download.call()):
                download.take(answer)
            return download.result()

    async def put_archive(self, sandbox_id: str, path: str, archive: calls.Source
                          ) -> types.ArchiveResult:
        with calls.PutArchive(sandbox_id, path, archive) as put:
            return await self._run(put.call())

    async def get_archive(self, sandbox_id: str, path: str, dest: calls.Dest
                          ) -> types.FileStat:
        with calls.GetArchive(sandbox_id, path, dest) as get:
            async for answer in self._stream(get.call()):
                get.take(answer)
            return get.stat

    def watch_files(self, sandbox_id: str, path: str = "") -> AsyncIterator[types.FileEvent]:
        return self._stream(calls.watch_files(sandbox_id, path))

    async def snapshot(self, sandbox_id: str, name: str = "") -> types.Snapshot:
        return await self._run(calls.snapshot(sandbox_id, name))

    async def fork(self, snapshot: str, **settings: Any) -> SandboxHandle:
        return await self.create_sandbox(snapshot=snapshot, **settings)

    async def list_snapshots(self) -> list[types.Snapshot]:
        return await self._run(calls.list_snapshots())

    async def remove_snapshot(self, snapshot: str) -> None:
        await self._run(calls.remove_snapshot(snapshot))

    # -- sessions ---------------------------------------------------------------------------

    async def open_session(self, argv: list[str], *, sandbox_id: str = "", input: str = "",
                           env: Mapping[str, str] | None = None,
                           labels: Mapping[str, str] | None = None, request_id: str = "",
                           delegations_from: str = "", **settings: Any) -> AsyncSession:
        request = calls.session_start(argv, sandbox_id, input, env, labels, request_id,
                                      delegations_from, settings)
        return await self._session(request)

    async def resume_session(self, session_id: str, after_seq: int = 0,
                             watch_only: bool = False) -> AsyncSession:
        return await self._session(calls.session_resume(session_id, after_seq, watch_only))

    async def _session(self, first) -> AsyncSession:
        call = self.sessions.Open(metadata=self.metadata)
        session = AsyncSession(call)
        await session._write(first)
        return await session._opened()

    async def get_session(self, session_id: str) -> types.SessionInfo:
        return await self._run(calls.get_session(session_id))

    async def list_sessions(self, selector: str = "", state: str | None = None
                            ) -> list[types.SessionInfo]:
        return await self._every(calls.list_sessions(selector, state))

    # -- deep tasks -------------------------------------------------------------------------

    async def submit_task(self, argv: list[str], **options: Any) -> types.Task:
        """As Client.submit_task."""
        return await self._run(calls.submit_task(argv, options))

    async def get_task(self, task_id: str) -> types.Task:
        return await self._run(calls.get_task(task_id))

    async def list_tasks(self, state: str | None = None, selector: str = "",
                         parent_session: str = "", limit: int = 0) -> list[types.Task]:
        return await self._run(calls.list_tasks(state, selector, parent_session, limit))

    async def cancel_task(self, task_id: str) -> types.Task:
        return await self._run(calls.cancel_task(task_id))

    def watch_task(self, task_id: str) -> AsyncIterator[types.Task | types.TaskLog]:
        return self._stream(calls.watch_task(task_id))

    async def wait_task(self, task_id: str) -> types.Task:
        async for update in self.watch_task(task_id):
            if isinstance(update, types.Task) and update.done:
                return update
        return await self.get_task(task_id)

    async def task_result(self, task_id: str) -> types.TaskResult:
        return await self._run(calls.task_result(task_id))
