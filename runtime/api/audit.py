"""corral.v1.Audit servicer: query, watch and verify the hash-chained audit log."""

from __future__ import annotations

import asyncio

from corral.sandbox.errors import PermissionDenied
from corral.v1 import audit_pb2 as pb

from .errors import Servicer, streaming, unary

MAX_QUERY_RECORDS = 10000


def record_to_proto(rec) -> pb.AuditRecord:
    return pb.AuditRecord(
        seq=rec.seq, time=rec.time, tenant=rec.tenant, peer=rec.peer, kind=rec.kind,
        sandbox_id=rec.sandbox_id, session_id=rec.session_id, detail_json=rec.detail_json,
        prev_hash=rec.prev_hash, hash=rec.hash,
    )


class AuditServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)

    def _tenant_filter(self, caller, requested: str) -> str | None:
        """Operators may read any tenant (all when unset); others only their own."""
        if caller.operator:
            return requested or None
        if requested and requested != caller.tenant:
            raise PermissionDenied("only operators read another tenant's audit records")
        return caller.tenant

    @unary
    async def Query(self, request, context):
        caller = self.caller(context)
        records = self.audit.query(
            since=request.since or None, until=request.until or None,
            sandbox_id=request.sandbox_id or None, session_id=request.session_id or None,
            tenant=self._tenant_filter(caller, request.tenant), kind=request.kind or None,
            limit=min(request.limit or 1000, MAX_QUERY_RECORDS), after_seq=request.after_seq,
        )
        return pb.AuditQueryResponse(records=[record_to_proto(r) for r in records])

    @streaming
    async def Watch(self, request, context):
        caller = self.caller(context)
        tenant = self._tenant_filter(caller, "")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=10000)

        def matches(rec) -> bool:
            return ((tenant is None or rec.tenant == tenant)
                    and (not request.sandbox_id or rec.sandbox_id == request.sandbox_id)
                    and (not request.kind or rec.kind == request.kind
                         or (request.kind.endswith(".") and rec.kind.startswith(request.kind))))

        def on_record(rec) -> None:  # called in the appending thread
            if matches(rec):
                loop.call_soon_threadsafe(_put, rec)

        def _put(rec) -> None:
            if queue.full():  # a watcher this slow loses the oldest; it can Query the gap
                queue.get_nowait()
            queue.put_nowait(rec)

        token = self.audit.subscribe(on_record)
        try:
            last = request.after_seq
            if request.after_seq:
                for rec in self.audit.query(after_seq=request.after_seq, tenant=tenant,
                                            sandbox_id=request.sandbox_id or None,
                                            kind=request.kind or None, limit=MAX_QUERY_RECORDS):
                    last = rec.seq
                    yield record_to_proto(rec)
            while True:
                rec = await queue.get()
                if rec.seq <= last:
                    continue
                last = rec.seq
                yield record_to_proto(rec)
        finally:
            self.audit.unsubscribe(token)

    @unary
    async def Verify(self, request, context):
        self.caller(context)
        result = await asyncio.get_running_loop().run_in_executor(None, self.audit.verify)
        return pb.AuditVerifyResponse(ok=result.ok, checked=result.checked,
                                      broken_at_seq=result.broken_at_seq or 0,
                                      problem=result.problem or "", segments=result.segments,
                                      first_seq=result.first_seq)
