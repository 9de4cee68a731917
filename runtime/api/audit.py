"""corral.v1.Audit servicer: query, watch and verify the hash-chained audit log."""

from __future__ import annotations

import asyncio
from collections import deque

from corral.sandbox.errors import PermissionDenied
from corral.v1 import audit_pb2 as pb

from ..policy import QuotaExceeded
from .servicer import Servicer, streaming, unary

MAX_QUERY_RECORDS = 10000
#: Bytes of records one Watch holds for a client that reads slower than they commit.
WATCH_QUEUE_BYTES = 4 << 20
#: Audit.Watch streams one tenant may hold at once (each is called for every record).
MAX_WATCHES_PER_TENANT = 16


def record_to_proto(rec) -> pb.AuditRecord:
    return pb.AuditRecord(
        seq=rec.seq, time=rec.time, tenant=rec.tenant, peer=rec.peer, kind=rec.kind,
        sandbox_id=rec.sandbox_id, session_id=rec.session_id, detail_json=rec.detail_json,
        prev_hash=rec.prev_hash, hash=rec.hash,
    )


#: The largest seq a record can have (SQLite's INTEGER); a uint64 after_seq above it means
#: "after every record" (SQLite refuses to bind it).
MAX_SEQ = (1 << 63) - 1


def _size(rec) -> int:
    """What a queued record costs, roughly: its detail plus the fixed fields."""
    return len(rec.detail_json) + 256


class AuditServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self._watches: dict[str, int] = {}  # tenant -> open Watch streams

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
            limit=min(request.limit or 1000, MAX_QUERY_RECORDS),
            after_seq=min(request.after_seq, MAX_SEQ),
        )
        return pb.AuditQueryResponse(records=[record_to_proto(r) for r in records])

    @streaming
    async def Watch(self, request, context):
        caller = self.caller(context)
        tenant = self._tenant_filter(caller, "")
        loop = asyncio.get_running_loop()
        held = self._watches.get(caller.tenant, 0)
        if held >= MAX_WATCHES_PER_TENANT:
            raise QuotaExceeded(f"this tenant already has {held} audit watches, the most "
                                f"one tenant may hold ({MAX_WATCHES_PER_TENANT})")
        self._watches[caller.tenant] = held + 1
        # Records waiting for this watcher, bounded in bytes: a watcher this slow loses
        # the oldest (its next record's seq tells it so; Query fills the gap).
        pending: deque = deque()
        pending_bytes = [0]
        ready = asyncio.Event()

        def matches(rec) -> bool:
            return ((tenant is None or rec.tenant == tenant)
                    and (not request.sandbox_id or rec.sandbox_id == request.sandbox_id)
                    and (not request.kind or rec.kind == request.kind
                         or (request.kind.endswith(".") and rec.kind.startswith(request.kind))))

        def on_record(rec) -> None:  # called in the appending thread
            if matches(rec):
                loop.call_soon_threadsafe(_put, rec)

        def _put(rec) -> None:
            pending.append(rec)
            pending_bytes[0] += _size(rec)
            while pending_bytes[0] > WATCH_QUEUE_BYTES and len(pending) > 1:
                pending_bytes[0] -= _size(pending.popleft())
            ready.set()

        token = self.audit.subscribe(on_record)
        try:
            last = min(request.after_seq, MAX_SEQ)
            if last:
                for rec in self.audit.query(after_seq=last, tenant=tenant,
                                            sandbox_id=request.sandbox_id or None,
                                            kind=request.kind or None, limit=MAX_QUERY_RECORDS):
                    last = rec.seq
                    yield record_to_proto(rec)
            while True:
                if not pending:
                    ready.clear()
                    await ready.wait()
                    continue
                rec = pending.popleft()
                pending_bytes[0] -= _size(rec)
                if rec.seq <= last:
                    continue
                last = rec.seq
                yield record_to_proto(rec)
        finally:
            self.audit.unsubscribe(token)
            self._watches[caller.tenant] -= 1
            if not self._watches[caller.tenant]:
                del self._watches[caller.tenant]

    @unary
    async def Verify(self, request, context):
        self.caller(context)
        result = await asyncio.get_running_loop().run_in_executor(None, self.audit.verify)
        return pb.AuditVerifyResponse(ok=result.ok, checked=result.checked,
                                      broken_at_seq=result.broken_at_seq or 0,
                                      problem=result.problem or "", segments=result.segments,
                                      first_seq=result.first_seq)

    @unary
    async def Status(self, request, context):
        caller = self.caller(context)
        if not caller.operator:
            raise PermissionDenied("only operators read the audit signing and sink status")
        gov = self.daemon.governance
        stats = gov.statistics() if gov is not None else {"sinks": [], "signing": None}
        signing = stats.get("signing") or {}
        pem = b""
        if gov is not None and gov.signer is not None:
            from ..signing import public_pem

            pem = public_pem(gov.signer.public_key)
        return pb.AuditStatusResponse(
            last_seq=self.audit.last_seq(), policy_digest=stats.get("policy_digest", ""),
            policy_reloads=stats.get("policy_reloads", 0),
            signing_key_id=signing.get("key_id", ""),
            signing_public_key_pem=pem.decode("ascii"),
            checkpoints=signing.get("checkpoints", 0),
            signed_through=signing.get("signed_through", 0),
            unsigned_records=signing.get("unsigned_records", 0),
            signing_failures=signing.get("failures", 0),
            sinks=[pb.AuditSinkStatus(name=s["name"], delivered_seq=s["delivered_seq"],
                                      lag=s["lag"], errors=s["errors"],
                                      last_error=s["last_error"][:1000], dropped=s["dropped"])
                   for s in stats["sinks"]])

    @unary
    async def Report(self, request, context):
        from .. import report
        from ..signing import _canonical

        caller = self.caller(context)
        body, signature = await report.build(self.daemon, caller, request.sandbox_id,
                                             run_probes=request.run_probes)
        return pb.AuditReportResponse(report_json=_canonical(body),
                                      signature_json=_canonical(signature))
