"""Protobuf wire helpers: wrap bytes the token core already encoded, without decoding them.

A servicer that streams batches yields bytes; the method's response serializer is the
identity (see runtime/daemon.py), and the .proto stays the truth for other clients.
"""

from __future__ import annotations

import grpc


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


def generic_handler(service_descriptor, servicer, streaming_bytes: frozenset[str] = frozenset()):
    """A grpc generic handler for one service, built from its descriptor.

    Methods named in streaming_bytes yield pre-encoded bytes (identity serializer); the
    others return or yield message objects.
    """
    from google.protobuf import message_factory

    handlers = {}
    for method in service_descriptor.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        fn = getattr(servicer, method.name)
        serializer = None if method.name in streaming_bytes else response_cls.SerializeToString
        kind = (method.client_streaming, method.server_streaming)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        handlers[method.name] = factory(
            fn, request_deserializer=request_cls.FromString, response_serializer=serializer
        )
    return grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers)
