"""What every servicer method runs in: who is calling, the RPC's frame, and `relay`.

A servicer is thin (proto in, domain call, proto out). This module holds the parts they all
share: `Servicer` (the caller, charged against its tenant's request rate), `unary` and
`streaming` (a trace span, log binding, and any error turned into a gRPC status through
`errors.abort_for`), and `relay` for the many RPCs that are nothing but one domain call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import operator
from collections.abc import Callable

import grpc

from .. import tracing
from ..logs import bind, bind_request
from ..metrics import code_of
from ..tracing import NO_TRACING
from .errors import abort_for, current_caller

#: Bytes of the unary request running in this task (0 for streams), for its rate weight.
current_request_bytes: contextvars.ContextVar = contextvars.ContextVar(
    "corral_request_bytes", default=0)


class Servicer:
    """Base of every servicer: who is calling, and the audit log denials go to."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.audit = daemon.audit

    def caller(self, context):
        """Who is calling; also counts the request against the tenant's request rate.

        Raises:
            Unauthenticated: an unknown token. QuotaExceeded: over the request rate.
        """
        caller = self.daemon.auth.identify(context)
        current_caller.set(caller)
        bind(tenant=caller.tenant)  # on this RPC's log lines (--log-format json)
        tracing.current().set("corral.tenant", caller.tenant)
        policies = getattr(self.daemon, "policies", None)
        if policies is not None:
            policies.charge(caller, policies.request_weight(current_request_bytes.get()))
        return caller


@contextlib.asynccontextmanager
async def _rpc_scope(servicer, request, context, name: str):
    """The frame every servicer method runs in: its request weighed and bound to the log,
    a trace span, and any error but an abort turned into a gRPC status (abort_for)."""
    # what the request weighs against the tenant's rate (Servicer.caller charges it)
    current_request_bytes.set(request.ByteSize() if hasattr(request, "ByteSize") else 0)
    bind_request(request)  # its ids on this RPC's log lines
    span = getattr(servicer.daemon, "tracing", NO_TRACING).rpc(name)
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        span.failed(code_of(exc), str(exc))
        await abort_for(servicer, context, exc, name)
    finally:
        span.end()


def unary(method):
    """Wrap a unary servicer coroutine: CorralError -> its status; a bug -> INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _rpc_scope(self, request, context, method.__qualname__):
            return await method(self, request, context)

    return wrapper


def streaming(method):
    """Same as unary, for async-generator servicer methods."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _rpc_scope(self, request, context, method.__qualname__):
            async for item in method(self, request, context):
                yield item

    return wrapper


class relay:  # noqa: N801 - used like a decorator, in a class body
    """A unary RPC that is one domain call for the caller, declared in the servicer's body:

        Resize = relay("manager.resize", "sandbox_id", "exec_id", "rows", "cols")

    is the method `Resize` that calls `self.manager.resize(caller, request.sandbox_id,
    request.exec_id, request.rows, request.cols)`, awaits the result when it is awaitable,
    and answers `answer(result)`. Without `answer` the response is the method's empty
    `<Name>Response`, taken from `empty`. The method is made once, when the class is: a
    relayed RPC is an ordinary `unary` method from then on (same span, errors, metrics).
    """

    def __init__(self, target: str, *fields: str, answer: Callable | None = None,
                 empty: type | None = None):
        if (answer is None) == (empty is None):
            raise TypeError("relay needs exactly one of answer= and empty=")
        self._call = operator.attrgetter(target)
        self._fields = fields
        self._answer = answer if answer is not None else (lambda _result: empty())

    def __set_name__(self, owner, name: str) -> None:
        call, fields, answer = self._call, self._fields, self._answer

        async def rpc(servicer, request, context):
            result = call(servicer)(servicer.caller(context),
                                    *[getattr(request, f) for f in fields])
            if inspect.isawaitable(result):
                result = await result
            return answer(result)

        rpc.__name__ = name
        rpc.__qualname__ = f"{owner.__qualname__}.{name}"
        setattr(owner, name, unary(rpc))
