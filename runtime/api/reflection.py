"""gRPC server reflection: `grpc.reflection.v1` served beside `grpc.reflection.v1alpha`.

grpcio-reflection ships only the v1alpha service, while current tools (grpcurl, Postman,
reflection clients for Node.js and Go) ask for v1 first and some never fall back. The two
protocols are the same messages with the same field numbers in different packages, so v1's
file descriptor is made here from the installed v1alpha one, its package renamed, and its
one method is served by the v1alpha servicer through a thin adapter that re-reads each
message in the other package (a few hundred bytes a call; reflection is not a hot path).
"""

from __future__ import annotations

V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_ALPHA_PACKAGE = "grpc.reflection.v1alpha"


def _renamed(type_name: str) -> str:
    prefix = f".{_ALPHA_PACKAGE}."
    return f".{V1_PACKAGE}." + type_name[len(prefix):] if type_name.startswith(prefix) \
        else type_name


def v1_service_descriptor():
    """The descriptor of grpc.reflection.v1.ServerReflection, in the default pool (added
    once; a library that already defines it is used as it is)."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(V1_SERVICE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    proto.ClearField("options")  # v1alpha's java/objc names would now be wrong

    def rename_fields(messages) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name:
                    field.type_name = _renamed(field.type_name)
            rename_fields(message.nested_type)

    rename_fields(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.Add(proto)
    return pool.FindServiceByName(V1_SERVICE)


class V1Reflection:
    """grpc.reflection.v1.ServerReflection on top of the v1alpha servicer (asyncio)."""

    def __init__(self, alpha_servicer, service_descriptor):
        from google.protobuf import message_factory
        from grpc_reflection.v1alpha import reflection_pb2

        method = service_descriptor.methods_by_name["ServerReflectionInfo"]
        self._alpha = alpha_servicer
        self._alpha_request = reflection_pb2.ServerReflectionRequest
        self._v1_response = message_factory.GetMessageClass(method.output_type)

    async def ServerReflectionInfo(self, request_iterator, context):
        async def as_alpha():
            async for request in request_iterator:
                yield self._alpha_request.FromString(request.SerializeToString())

        async for response in self._alpha.ServerReflectionInfo(as_alpha(), context):
            yield self._v1_response.FromString(response.SerializeToString())
