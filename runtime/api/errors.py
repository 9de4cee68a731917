"""One place where domain errors become gRPC statuses (and denials become audit records)."""

from __future__ import annotations

import asyncio
import contextvars
import logging

import grpc

from corral.sandbox.errors import CorralError, PermissionDenied, Unauthenticated, as_exhaustion

from ..metrics import NO_METRICS
from ..policy import QuotaExceeded
from .bounds import bounded_message

log = logging.getLogger("corral.api")

#: Seconds an unauthenticated, over-quota or over-rate request waits for its refusal.
REFUSAL_DELAY_S = 0.1
#: The Caller of the RPC running in this task (set by Servicer.caller), for denial records.
current_caller: contextvars.ContextVar = contextvars.ContextVar("corral_caller", default=None)


#: Called with each ResourceExhausted an RPC ended with (the daemon's health monitor looks
#: again at once instead of at its next tick).
exhaustion_listeners: list = []


def exhaustion_seen(exc) -> None:
    for listener in list(exhaustion_listeners):
        try:
            listener(exc)
        except Exception:  # noqa: BLE001 - a listener never changes the answer
            log.exception("exhaustion listener failed")


def status_of(exc: CorralError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_status, grpc.StatusCode.INTERNAL)


def deny_later(servicer, context, exc: CorralError, method: str):
    """Count a denial (PERMISSION_DENIED, UNAUTHENTICATED, or a class marked `denial`, such
    as a tenant's quota); other errors are not denials. `context` (for the peer) may be None
    once the caller is known, as for a failed request on an OpenMany stream.

    Denials are rate-limited per (tenant, peer host, status) (`AuditLog.deny`): a flood of
    bad tokens costs a counter, not an fsync per call, and ends up in `denied.summary`
    records. Returns the future of the `denied` record, or None (not a denial, or counted
    into a summary). Never waits for the disk.
    """
    denial = isinstance(exc, (PermissionDenied, Unauthenticated)) or getattr(exc, "denial", False)
    if not denial or servicer.audit is None:
        return None
    caller = current_caller.get()
    try:
        return servicer.audit.deny(
            # auth.ForeignId is recorded under no tenant (operators only), see there
            tenant=getattr(exc, "audit_tenant", caller.tenant if caller else ""),
            peer=caller.peer if caller else ((context.peer() if context else "") or ""),
            status=exc.grpc_status, method=method,
            # what the caller was not told (auth.ForeignId: whose id it was) goes on record
            reason=getattr(exc, "audit_reason", None) or str(exc),
        )
    except CorralError:  # the log is closing: the refusal stands, the daemon's log says so
        log.exception("%s: denial not recorded", method)
        return None


def record_denial(servicer, context, exc: CorralError, method: str) -> None:
    """`deny_later`, then wait until its `denied` record (if any) is durable, for callers
    that answer synchronously. Only the first denials of a window wait (DENIAL_BURST)."""
    pending = deny_later(servicer, context, exc, method)
    if pending is not None:
        try:
            pending.result()
        except Exception:  # noqa: BLE001 - the refusal stands; the log says why
            log.exception("%s: denial not recorded", method)


async def abort_for(servicer, context, exc: Exception, method: str) -> None:
    """End the RPC for exc: a CorralError with its own status, running out of descriptors,
    disk or memory RESOURCE_EXHAUSTED (as_exhaustion), anything else INTERNAL."""
    getattr(servicer.daemon, "metrics", NO_METRICS).rpc_failed(method, exc)
    exhausted = as_exhaustion(exc)
    if exhausted is not None:
        log.warning("%s refused: %s", method, exhausted)
        exhaustion_seen(exhausted)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exhausted))
    if isinstance(exc, (Unauthenticated, QuotaExceeded)):
        # A flood is answered slowly: a caller that waits for each answer (most do) is
        # cut to a few requests a second per connection, at no cost to the daemon (a
        # timer, not a thread), and the loop keeps its time for other tenants. Quota and
        # rate refusals are both a tenant over its share.
        await asyncio.sleep(REFUSAL_DELAY_S)
    if isinstance(exc, CorralError):
        pending = deny_later(servicer, context, exc, method)
        if pending is not None:  # recorded before the answer, without blocking the loop
            try:
                await asyncio.wrap_future(pending)
            except Exception:  # noqa: BLE001 - the refusal stands; the log says why
                log.exception("%s: denial not recorded", method)
        # a message may quote a request's field: never echo more than ~200 bytes of it
        await context.abort(status_of(exc), bounded_message(str(exc)))
    log.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the daemon's log")
