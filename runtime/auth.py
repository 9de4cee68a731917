"""Who is calling: tenants from the local socket or from bearer tokens on TCP."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from corral.sandbox.errors import InvalidSpec, NotFound, Unauthenticated

from .config import check_tenant

LOCAL_TENANT = "local"
TENANT_HEADER = "x-corral-tenant"


@dataclass(frozen=True)
class Caller:
    """The identity every action is recorded under."""

    tenant: str
    peer: str
    operator: bool = False


class ForeignId(NotFound):
    """Another tenant's id, answered exactly as an unknown one (NOT_FOUND, the same message)
    so that a caller cannot learn which ids exist. The daemon still records the attempt as a
    denial, but under no tenant (`audit_tenant` ""), which only operators read: in the
    caller's own records a denial would tell it that the id exists (unknown ids make none).
    `audit_reason` names both tenants."""

    denial = True
    audit_tenant = ""

    def __init__(self, message: str, caller: str, kind: str, object_id: str,
                 owner: str) -> None:
        super().__init__(message)
        self.audit_reason = (f"tenant {caller!r} asked for {kind} {object_id!r} of tenant "
                             f"{owner!r}")


def check_owner(caller: Caller, owner: str, kind: str, object_id: str, message: str) -> None:
    """Raise ForeignId (as NOT_FOUND with `message`, the unknown-id message) when the caller
    is not `owner`."""
    if owner != caller.tenant:
        raise ForeignId(message, caller.tenant, kind, object_id, owner)


class Authenticator:
    """Maps a gRPC call to a Caller.

    The unix socket is mode 0600, so whoever connects runs as the daemon's own user; such a
    caller may name a tenant with the x-corral-tenant header (default "local"). TCP callers
    must present "authorization: Bearer TOKEN"; the token decides the tenant.
    """

    def __init__(self, tokens: dict[str, str], operators: tuple[str, ...] = (LOCAL_TENANT,)):
        self._tokens = dict(tokens)
        self._operators = frozenset(operators)

    def identify(self, context) -> Caller:
        """Raises Unauthenticated for a TCP call without a known token."""
        metadata = {k: v for k, v in (context.invocation_metadata() or ())}
        peer = context.peer() or ""
        if peer.startswith("unix:"):
            tenant = metadata.get(TENANT_HEADER, LOCAL_TENANT)
            try:
                check_tenant(tenant, TENANT_HEADER)
            except InvalidSpec as exc:
                raise Unauthenticated(str(exc)) from None
            return Caller(tenant, f"unix:uid={os.geteuid()}", tenant in self._operators)
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("this listener needs 'authorization: Bearer TOKEN'")
        tenant = self._lookup(token.strip())
        if tenant is None:
            raise Unauthenticated("unknown bearer token")
        return Caller(tenant, peer, tenant in self._operators)

    def _lookup(self, token: str) -> str | None:
        found = None
        for known, tenant in self._tokens.items():
            # compare every token, in constant time, so timing tells nothing
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        return found
