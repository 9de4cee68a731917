"""Protobuf wire helpers: wrap bytes the token core already encoded, without decoding them.

A servicer that streams batches yields bytes; the method's response serializer is the
identity (see runtime/daemon.py), and the .proto stays the truth for other clients.

Every service's handlers are built here (`generic_handler`), so what holds for every RPC
lives here too: a request that does not decode is INVALID_ARGUMENT, and the typed times
(Timestamp, Duration) beside the deprecated numbers of seconds are taken from requests and
filled into answers (`accept_typed`, `fill_typed`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math

import grpc
from google.protobuf.descriptor import FieldDescriptor

#: The largest message the daemon sends or takes (a Tasks.Result page that asked for it);
#: gRPC's own default is 4 MiB. Clients set their receive limit to it.
MAX_MESSAGE_BYTES = 16 << 20


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def first_seq(batch: bytes) -> int:
    """StreamBatch.first_seq (field 1, a varint) of an encoded batch, without decoding it."""
    if not batch or batch[0] != 0x08:  # canonical encoding puts field 1 first; 0 is omitted
        return 0
    value, shift = 0, 0
    for byte in batch[1:11]:
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        shift += 7
    return 0


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) holding payload."""
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


# -- typed times: google.protobuf.Timestamp and Duration beside the older numbers ------------
#
# Each deprecated number of seconds (double created_at, uint32 ttl_s, ...) is declared right
# before the Timestamp or Duration holding the same value: that order is the pairing (a unit
# test checks every deprecated field has its partner). Requests may set either: the typed one
# is copied into the number before the servicer reads it, so servicers read only numbers.
# Answers get both: the typed one is filled from the number as the answer is serialized (or,
# for the pre-encoded streams, where the servicer encodes it). 0 stays "unset" either way.

class FieldRefused(ValueError):
    """A request field the wire refuses before any servicer: INVALID_ARGUMENT, its text
    `field.path: problem` as InvalidSpec's (which this module cannot import: the wire-level
    client imports it, and may not reach sandbox/)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


_TYPED = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})
_NANOS = 1_000_000_000
#: Times travel as float seconds inside the daemon: exact to the microsecond, not beyond.
_MICROS = 1_000_000
_PLANS: dict = {}


def _plan(desc) -> tuple[tuple, tuple]:
    """(pairs, nested) of a message type: its (deprecated number, typed) field pairs, and
    its message fields whose types hold pairs somewhere below (cached per type)."""
    plan = _PLANS.get(desc)
    if plan is None:
        _PLANS[desc] = ((), ())  # a type that contains itself stops here
        fields = desc.fields
        pairs = tuple((number, typed) for number, typed in itertools.pairwise(fields)
                      if number.GetOptions().deprecated and typed.message_type is not None
                      and typed.message_type.full_name in _TYPED)
        nested = tuple(f for f in fields if f.message_type is not None
                       and f.message_type.full_name not in _TYPED
                       and not f.message_type.GetOptions().map_entry
                       and any(_plan(f.message_type)))
        plan = _PLANS[desc] = (pairs, nested)
    return plan


def _children(msg, field, path: str):
    """(child message, its field path) of a message field, repeated or not."""
    if field.is_repeated:
        for i, child in enumerate(getattr(msg, field.name)):
            yield child, f"{path}{field.name}[{i}]."
    elif msg.HasField(field.name):
        yield getattr(msg, field.name), f"{path}{field.name}."


def fill_typed(msg):
    """msg with each typed time set from its deprecated number (unset where the number is
    0, or beyond what a Timestamp or Duration holds), in nested messages too; returns msg."""
    pairs, nested = _plan(msg.DESCRIPTOR)
    for number, typed in pairs:
        value = getattr(msg, number.name)
        msg.ClearField(typed.name)
        if value:
            with contextlib.suppress(ValueError, OverflowError):
                # past what the type holds (a file dated after year 9999): the number only
                getattr(msg, typed.name).FromMicroseconds(round(value * _MICROS))
    for field in nested:
        for child, _path in _children(msg, field, ""):
            fill_typed(child)
    return msg


def _seconds_of(number, nanos: int, where: str):
    """The deprecated number's value for a typed time of `nanos`: seconds as a float, or
    rounded up to whole seconds for an integer field (refused past its range)."""
    if number.type == FieldDescriptor.TYPE_DOUBLE:
        return nanos / _NANOS
    whole = math.ceil(nanos / _NANOS)
    if whole >= 1 << 32:
        raise FieldRefused(where, f"{whole} seconds is over the limit of {(1 << 32) - 1}")
    return whole


def accept_typed(msg, path: str = "") -> None:
    """Copy each typed time a request set into its deprecated number (the servicers read
    the numbers), in nested messages too.

    Raises:
        FieldRefused: naming the typed field: both are set and differ, a Duration is
            negative, or either is out of its type's range.
    """
    pairs, nested = _plan(msg.DESCRIPTOR)
    for number, typed in pairs:
        if not msg.HasField(typed.name):
            continue
        where = path + typed.name
        try:
            nanos = getattr(msg, typed.name).ToNanoseconds()
        except ValueError as exc:  # seconds or nanos out of the type's range
            raise FieldRefused(where, str(exc).rstrip(".")) from None
        if typed.message_type.full_name.endswith("Duration") and nanos < 0:
            raise FieldRefused(where, f"{nanos / _NANOS}s must not be negative")
        value = _seconds_of(number, nanos, where)
        current = getattr(msg, number.name)
        if current and not abs(current - value) < 1 / _MICROS:  # NaN and inf differ too
            raise FieldRefused(where, f"{nanos / _NANOS}s differs from the deprecated "
                                     f"{number.name} ({current}); set one of them")
        setattr(msg, number.name, value)
    for field in nested:
        for child, child_path in _children(msg, field, path):
            accept_typed(child, child_path)


class Refused:
    """What the request deserializer hands on for a request refused before the servicer
    sees it: bytes that are not the method's message (gRPC would answer UNKNOWN with a
    Python class name), or typed and deprecated fields that disagree. The handler answers
    INVALID_ARGUMENT with `message`."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _request_deserializer(request_cls):
    name = request_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            request = request_cls.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, RecursionError (nesting), ...
            return Refused(f"request: the {len(data)} bytes received are not a "
                           f"valid {name} message")
        try:
            accept_typed(request)
        except FieldRefused as exc:
            return Refused(str(exc))
        return request

    return deserialize


async def _refuse(context, bad: Refused) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


def _checked(fn, client_streaming: bool, server_streaming: bool):
    """fn, refusing undecodable requests (INVALID_ARGUMENT) before the servicer sees them.

    A streaming fn may yield its responses or write them with context.write (grpc's own
    health servicer does); the wrapper is of the same kind, as grpc looks at which it is.
    """
    yields = inspect.isasyncgenfunction(fn)
    if client_streaming:
        async def requests_checked(requests, context):
            async for request in requests:
                if isinstance(request, Refused):
                    await _refuse(context, request)
                yield request

        if server_streaming and yields:
            async def stream_stream(requests, context):
                async for item in fn(requests_checked(requests, context), context):
                    yield item
            return stream_stream

        async def stream_unary(requests, context):
            return await fn(requests_checked(requests, context), context)
        return stream_unary
    if server_streaming and yields:
        async def unary_stream(request, context):
            if isinstance(request, Refused):
                await _refuse(context, request)
            async for item in fn(request, context):
                yield item
        return unary_stream

    async def unary_unary(request, context):
        if isinstance(request, Refused):
            await _refuse(context, request)
        return await fn(request, context)
    return unary_unary


def _unimplemented(method_name: str, server_streaming: bool):
    async def unimplemented(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{method_name} is declared but this daemon does not serve it")

    if not server_streaming:
        return unimplemented

    async def unimplemented_stream(request, context):
        await unimplemented(request, context)
        yield b""  # never reached: makes this an async generator
    return unimplemented_stream


def _serializer(response_cls, pre_encoded: bool):
    """None for a method whose servicer encodes its answers itself; else the message's
    serializer, filling typed times first where the message holds any."""
    if pre_encoded:
        return None
    if not any(_plan(response_cls.DESCRIPTOR)):
        return response_cls.SerializeToString
    return lambda answer: fill_typed(answer).SerializeToString()


def generic_handler(service_descriptor, servicer, streaming_bytes: frozenset[str] = frozenset()):
    """A grpc generic handler for one service, built from its descriptor.

    Methods named in streaming_bytes yield pre-encoded bytes (identity serializer); the
    others return or yield message objects. A request that does not decode is answered
    INVALID_ARGUMENT; a method the servicer lacks, UNIMPLEMENTED.
    """
    from google.protobuf import message_factory

    handlers = {}
    for method in service_descriptor.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        kind = (method.client_streaming, method.server_streaming)
        fn = getattr(servicer, method.name, None)
        if fn is None:
            fn = _unimplemented(f"{service_descriptor.full_name}.{method.name}",
                                method.server_streaming)
        else:
            fn = _checked(fn, *kind)
        serializer = _serializer(response_cls, method.name in streaming_bytes)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        handlers[method.name] = factory(
            fn, request_deserializer=_request_deserializer(request_cls),
            response_serializer=serializer,
        )
    return grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers)
