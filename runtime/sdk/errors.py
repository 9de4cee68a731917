"""corral.errors: the SDK's exceptions, one class per gRPC status a platform acts on.

Every class is a `corral.runtime.client.ClientError` too (`.code` is the grpc.StatusCode),
so code written against the plain client keeps catching them. A status without a class of
its own (UNAUTHENTICATED, DATA_LOSS, ...) is raised as the base, `CorralError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc

from corral.runtime.client import ClientError


class CorralError(ClientError):
    """A request to the daemon failed; `.code` is its gRPC status, `.details` the
    daemon's message (shaped `field.path: problem` where a field is at fault)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.details = details
        super().__init__(code, details)


class InvalidArgument(CorralError, ValueError):
    """The request is malformed; the message names the argument or field."""


class NotFound(CorralError, LookupError):
    """No such sandbox, session, task or snapshot (another tenant's reads the same)."""


class AlreadyExists(CorralError):
    """A request_id was reused with a different request."""


class PermissionDenied(CorralError):
    """The caller's tenant or token may not do this."""


class ResourceExhausted(CorralError):
    """A quota, a limit or the daemon's capacity is reached."""


class FailedPrecondition(CorralError):
    """The object is in the wrong state for this (a paused sandbox, a finished session)."""


class Unavailable(CorralError, ConnectionError):
    """No daemon answers at the address (or its socket does not exist)."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def error_for(code: grpc.StatusCode, details: str) -> CorralError:
    """The typed exception of a gRPC status."""
    return _BY_CODE.get(code, CorralError)(code, details)


def typed(exc: grpc.RpcError | ClientError) -> CorralError:
    """The typed form of a failed call (an RpcError of grpc or grpc.aio, or a ClientError
    of the plain client); a CorralError is returned as it is."""
    if isinstance(exc, CorralError):
        return exc
    if isinstance(exc, ClientError):
        return error_for(exc.code, str(exc).removeprefix(f"{exc.code.name}: "))
    return error_for(exc.code(), exc.details() or "")


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise what fails inside as a typed CorralError."""
    try:
        yield
    except (grpc.RpcError, ClientError) as exc:
        raise typed(exc) from None


def translated_iter(items):
    """The items of a (sync) stream, a failure raised as a typed CorralError; a cancel of
    ours (the caller stopped early) ends it quietly."""
    try:
        yield from items
    except (grpc.RpcError, ClientError) as exc:
        if _cancelled(exc):
            return
        raise typed(exc) from None


async def translated_aiter(items) -> AsyncIterator:
    """translated_iter for an async stream."""
    try:
        async for item in items:
            yield item
    except (grpc.RpcError, ClientError) as exc:
        if _cancelled(exc):
            return
        raise typed(exc) from None


def _cancelled(exc) -> bool:
    code = exc.code if isinstance(exc, ClientError) else exc.code()
    return code == grpc.StatusCode.CANCELLED
