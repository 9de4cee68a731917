"""corral.v1.Sessions servicer: the bidirectional Open stream <-> SessionManager."""

from __future__ import annotations

import asyncio
import contextlib

from corral.sandbox.errors import CorralError, InvalidSpec, PermissionDenied
from corral.v1 import session_pb2 as pb

from ..sessions import Exited, TurnEnded, TurnStarted
from .errors import Servicer, streaming
from .sandboxes import spec_from_proto
from .wire import field_bytes, first_seq


def _event(**kw) -> bytes:
    return pb.SessionEvent(**kw).SerializeToString()


def _session_event(ev) -> bytes:
    if isinstance(ev, TurnStarted):
        return _event(turn_started=pb.TurnStarted(turn=ev.turn, seq=ev.seq))
    if isinstance(ev, TurnEnded):
        return _event(turn_ended=pb.TurnEnded(turn=ev.turn, status=ev.status, seq=ev.seq))
    if isinstance(ev, Exited):
        return _event(exited=pb.SessionExited(returncode=ev.returncode, reason=ev.reason))
    raise TypeError(ev)


class SessionsServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.manager = daemon.sessions

    @streaming
    async def Open(self, request_iterator, context):
        caller = self.caller(context)
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        kind = first.WhichOneof("request")
        watch_only = False
        if kind == "start":
            start = first.start
            target = start.WhichOneof("target")
            session = await self.manager.open(
                caller, argv=list(start.argv),
                spec=spec_from_proto(start.spec) if target != "sandbox_id" else None,
                sandbox_id=start.sandbox_id if target == "sandbox_id" else "",
                env=dict(start.env), first_input=start.input,
            )
            after = 0
        elif kind == "resume":
            session = self.manager.get(caller, first.resume.session_id)
            after = first.resume.after_seq
            watch_only = first.resume.watch_only
            self.audit.append("session.resume", tenant=caller.tenant, peer=caller.peer,
                              sandbox_id=session.sandbox_id, session_id=session.id,
                              detail={"after_seq": after, "watch_only": watch_only})
        else:
            raise InvalidSpec("request", "the first message must be start or resume")

        self.manager.attach(session)
        queue: asyncio.Queue = asyncio.Queue()
        session.listeners.add(queue)
        watcher = session.hub.watch(after or None)
        reader = asyncio.ensure_future(self._read_requests(caller, session, requests,
                                                            watch_only, queue))
        try:
            yield _event(opened=pb.SessionOpened(session_id=session.id,
                                                 sandbox_id=session.sandbox_id,
                                                 after_seq=after))
            if session.exited is not None:
                queue.put_nowait(session.exited)
            lost = watcher.lost_entries
            batch_fut = asyncio.ensure_future(watcher.next_batch())
            queue_fut = asyncio.ensure_future(queue.get())
            stream_done = False
            exited = None
            while True:
                waiting = {queue_fut} if stream_done else {batch_fut, queue_fut}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if batch_fut in done:
                    batch = batch_fut.result()
                    if batch is None:
                        stream_done = True
                    else:
                        if watcher.lost_entries > lost:
                            # the log evicted entries this client had not read: say so,
                            # then the batch (which starts at the first one still held)
                            lost = watcher.lost_entries
                            yield _event(lagged=pb.SessionLagged(
                                first_available_seq=first_seq(batch)))
                        yield field_bytes(2, batch)
                        batch_fut = asyncio.ensure_future(watcher.next_batch())
                if queue_fut in done:
                    item = queue_fut.result()
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, Exited):
                        exited = item
                    else:
                        yield _session_event(item)
                    queue_fut = asyncio.ensure_future(queue.get())
                if exited is not None and stream_done:
                    yield _session_event(exited)
                    return
        finally:
            for fut in (locals().get("batch_fut"), locals().get("queue_fut"), reader):
                if fut is not None:
                    fut.cancel()
            watcher.close()
            session.listeners.discard(queue)
            self.manager.detach(session)

    async def _read_requests(self, caller, session, requests, watch_only, queue) -> None:
        """Steering messages from this client, applied as they arrive."""
        try:
            async for req in requests:
                kind = req.WhichOneof("request")
                if kind in ("input", "interrupt", "close") and watch_only:
                    raise PermissionDenied("this stream was opened watch-only")
                if kind == "input":
                    self.manager.input(caller, session, req.input.text)
                elif kind == "interrupt":
                    self.manager.interrupt(caller, session)
                elif kind == "close":
                    await self.manager.close(caller, session)
                else:
                    raise InvalidSpec("request", f"{kind} is only valid as the first message")
        except asyncio.CancelledError:
            raise
        except CorralError as exc:
            queue.put_nowait(exc)
        except Exception as exc:  # the client went away mid-read
            with contextlib.suppress(Exception):
                queue.put_nowait(CorralError(f"reading requests failed: {exc}"))
