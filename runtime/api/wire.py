"""Protobuf wire helpers: wrap bytes the token core already encoded, without decoding them.

A servicer that streams batches yields bytes; the method's response serializer is the
identity (see runtime/daemon.py), and the .proto stays the truth for other clients.
"""

from __future__ import annotations

import inspect

import grpc

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


class Undecodable:
    """What the request deserializer hands on for bytes that are not the method's message;
    the handler answers INVALID_ARGUMENT (gRPC would answer UNKNOWN with a Python class
    name)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _request_deserializer(request_cls):
    name = request_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return request_cls.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, RecursionError (nesting), ...
            return Undecodable(f"request: the {len(data)} bytes received are not a "
                               f"valid {name} message")

    return deserialize


async def _refuse(context, bad: Undecodable) -> None:
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
                if isinstance(request, Undecodable):
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
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for item in fn(request, context):
                yield item
        return unary_stream

    async def unary_unary(request, context):
        if isinstance(request, Undecodable):
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
        serializer = None if method.name in streaming_bytes else response_cls.SerializeToString
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
