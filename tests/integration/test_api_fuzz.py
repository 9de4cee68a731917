"""Nothing a client sends makes the daemon answer INTERNAL or UNKNOWN (issue 17).

A property-based test over every RPC of every service the daemon serves (corral.v1, health,
reflection), found by walking the proto
descriptors (a method added later is fuzzed without touching this file): hypothesis builds
requests field by field from each method's input descriptor (huge and negative numbers,
NaN, unknown enum values, text, ids that exist and ids that do not), and also mutates their
encoding (truncated, bits flipped, garbage appended) or sends bytes that are no message at
all. Each call may end only with a documented status, in-band session errors included, and
after each method the daemon must still serve. `derandomize` keeps CI runs identical.
"""

from __future__ import annotations

import contextlib
import math

import grpc
import pytest
from google.protobuf import descriptor as pd
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.runtime.client import ClientError
from corral.v1 import audit_pb2, image_pb2, sandbox_pb2, session_pb2, snapshot_pb2, task_pb2

from .daemon_harness import DaemonProcess

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

#: What a client may be answered: none of these says "the daemon has a bug".
DOCUMENTED = {
    "OK", "CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "UNAUTHENTICATED",
}
CALL_TIMEOUT_S = 1.5
MODULES = (sandbox_pb2, session_pb2, audit_pb2, task_pb2, snapshot_pb2, image_pb2, health_pb2,
           reflection_pb2)
METHODS = [(service, method) for module in MODULES
           for service in module.DESCRIPTOR.services_by_name.values()
           for method in service.methods]

INTS = st.one_of(st.integers(-3, 3), st.sampled_from([10**9, 2**31 - 1, 2**32 - 1, 2**63 - 1,
                                                      -(2**63), 2**64 - 1, 1 << 40]),
                 st.integers(-(2**63), 2**64 - 1))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -1.0, 1e9, 1e300, math.inf, -math.inf]))


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("fuzz"),
                      args=("--max-sandboxes", "6", "--sandbox-ttl", "5m")).start()
    ids = {"sbx-000000000000", "exe-000000000000", "ses-000000000000", "task-0"}
    owner = d.client(tenant="fuzz")
    # a session for the resume test, made first: the fuzz fills the daemon's sandboxes
    d.resume_sandbox = owner.create_sandbox()
    owner.write_file(d.resume_sandbox.id, "agent.py", b"import sys\nsys.stdin.read()\n")
    d.resume_stream = owner.open_session(["python3", "/workspace/agent.py"],
                                         sandbox_id=d.resume_sandbox.id)
    d.resume_session = next(iter(d.resume_stream)).opened.session_id
    sb = owner.create_sandbox()
    ids.add(sb.id)
    ids.add(next(owner.exec(sb.id, ["sleep", "1"])).started.exec_id)
    ids.add(owner.submit_task(["true"]).id)
    d.known_ids = sorted(ids)
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    assert d.leftovers() == {}


def scalar(field: pd.FieldDescriptor, ids: list[str]):
    t = pd.FieldDescriptor
    if field.type == t.TYPE_STRING:
        return st.one_of(st.sampled_from(ids), st.text(max_size=40),
                         st.sampled_from(["", "/", "..", "../../etc/passwd", "a" * 5000]))
    if field.type == t.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == t.TYPE_BOOL:
        return st.booleans()
    if field.type in (t.TYPE_DOUBLE, t.TYPE_FLOAT):
        return FLOATS if field.type == t.TYPE_DOUBLE else st.floats(width=32)
    if field.type == t.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                         st.integers(-5, 1000))
    bits = {t.TYPE_INT32: (-(2**31), 2**31 - 1), t.TYPE_SINT32: (-(2**31), 2**31 - 1),
            t.TYPE_SFIXED32: (-(2**31), 2**31 - 1), t.TYPE_UINT32: (0, 2**32 - 1),
            t.TYPE_FIXED32: (0, 2**32 - 1), t.TYPE_UINT64: (0, 2**64 - 1),
            t.TYPE_FIXED64: (0, 2**64 - 1)}.get(field.type, (-(2**63), 2**63 - 1))
    return INTS.filter(lambda v: bits[0] <= v <= bits[1])


@st.composite
def message(draw, descriptor: pd.Descriptor, ids: list[str], depth: int = 0):
    """A message of this type with a random subset of its fields set."""
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = field.message_type.fields_by_name["key"], \
                field.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                key = draw(scalar(key_f, ids))
                if value_f.message_type is None:
                    getattr(msg, field.name)[key] = draw(scalar(value_f, ids))
                elif depth < 3:
                    getattr(msg, field.name)[key].CopyFrom(
                        draw(message(value_f.message_type, ids, depth + 1)))
            continue
        repeated = field.is_repeated
        count = draw(st.integers(0, 3)) if repeated else 1
        for _ in range(count):
            if field.message_type is not None:
                if depth >= 3:
                    break
                value = draw(message(field.message_type, ids, depth + 1))
                if repeated:
                    getattr(msg, field.name).add().CopyFrom(value)
                else:
                    getattr(msg, field.name).CopyFrom(value)
            elif repeated:
                getattr(msg, field.name).append(draw(scalar(field, ids)))
            else:
                setattr(msg, field.name, draw(scalar(field, ids)))
    return msg


@st.composite
def request_bytes(draw, descriptor: pd.Descriptor, ids: list[str]) -> bytes:
    """A request as sent on the wire: well formed, mutated, or not a message at all."""
    how = draw(st.sampled_from(["message", "message", "mutated", "garbage"]))
    if how == "garbage":
        return draw(st.one_of(st.binary(min_size=1, max_size=200),
                              st.sampled_from([b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f",
                                               b"\x0a\x05abc", b"\x08", b"\x0b" * 64,
                                               b"\x0a\x02" * 2000])))
    data = draw(message(descriptor, ids)).SerializeToString()
    if how == "mutated" and data:
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "append"]))
            if op == "flip" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "cut" and data:
                del data[draw(st.integers(0, len(data) - 1)):]
            else:
                data += draw(st.binary(min_size=1, max_size=16))
        data = bytes(data)
    return data


def in_band_errors(method: pd.MethodDescriptor, raw: bytes) -> list[str]:
    """Error codes carried inside a response (SessionError.code of Open/OpenMany)."""
    try:
        reply = message_factory.GetMessageClass(method.output_type).FromString(raw)
    except Exception:  # noqa: BLE001 - a response the daemon encoded itself
        return ["UNDECODABLE RESPONSE"]
    found = []

    def walk(msg):
        for field, value in msg.ListFields():
            if field.message_type is None:
                if field.name == "code" and isinstance(value, str):
                    found.append(value)
                continue
            if field.message_type.GetOptions().map_entry:
                values = [v for v in value.values() if hasattr(v, "ListFields")]
            else:
                values = value if field.is_repeated else [value]
            for v in values:
                walk(v)

    walk(reply)
    return [c for c in found if c not in DOCUMENTED]


def call(channel, service, method, requests: list[bytes], tenant: str) -> tuple[str, list[str]]:
    """(status name, undocumented in-band codes) of one call with these raw requests."""
    path = f"/{service.full_name}/{method.name}"
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (method.client_streaming, method.server_streaming)]
    stub = kind(path, request_serializer=None, response_deserializer=None)
    metadata = (("x-corral-tenant", tenant),)
    arg = iter(requests) if method.client_streaming else requests[0]
    bad: list[str] = []
    try:
        if method.server_streaming:
            for raw in stub(arg, timeout=CALL_TIMEOUT_S, metadata=metadata):
                bad += in_band_errors(method, raw)
        else:
            bad += in_band_errors(method, stub(arg, timeout=CALL_TIMEOUT_S, metadata=metadata))
    except grpc.RpcError as exc:
        return exc.code().name, bad
    return "OK", bad


def serves(daemon) -> bool:
    with contextlib.suppress(ClientError, grpc.RpcError):
        return daemon.health() == "SERVING" and daemon.client().list_sandboxes() is not None
    return False


@pytest.mark.parametrize(("service", "method"), METHODS,
                         ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_no_request_gets_internal_or_unknown(fuzz_daemon, service, method):
    ids = fuzz_daemon.known_ids
    seen: dict[str, int] = {}
    with grpc.insecure_channel(f"unix:{fuzz_daemon.socket}") as channel:

        @settings(max_examples=15 if method.server_streaming else 40, deadline=None,
                  derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(requests=st.lists(request_bytes(method.input_type, ids), min_size=1,
                                 max_size=3 if method.client_streaming else 1),
               tenant=st.sampled_from(["fuzz", "local"]))
        def check(requests, tenant):
            code, bad = call(channel, service, method, requests, tenant)
            seen[code] = seen.get(code, 0) + 1
            assert code in DOCUMENTED, (code, requests)
            assert bad == [], (bad, requests)

        check()
    assert serves(fuzz_daemon), fuzz_daemon.log()[-3000:]
    assert set(seen) <= DOCUMENTED


def test_undecodable_bytes_are_invalid_argument_naming_the_message(fuzz_daemon):
    with grpc.insecure_channel(f"unix:{fuzz_daemon.socket}") as channel:
        get = channel.unary_unary("/corral.v1.Sandboxes/Get")
        with pytest.raises(grpc.RpcError) as exc:
            get(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details() == ("request: the 6 bytes received are not a valid "
                                       "corral.v1.GetSandboxRequest message")
        open_ = channel.stream_stream("/corral.v1.Sessions/Open")
        with pytest.raises(grpc.RpcError) as exc:
            list(open_(iter([b"\xff\xff"]), timeout=5))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details() == ("request: the 2 bytes received are not a valid "
                                       "corral.v1.SessionRequest message")


def test_resume_past_the_newest_entry_is_invalid_argument(fuzz_daemon):
    client = fuzz_daemon.client(tenant="fuzz")
    session_id = fuzz_daemon.resume_session
    try:
        resumed = client.resume_session(session_id, after_seq=10**9)
        with pytest.raises(ClientError) as exc:
            list(resumed)
        assert str(exc.value).startswith(
            "INVALID_ARGUMENT: resume.after_seq: 1000000000 is past the newest entry of the "
            "stream (seq ")
        many = client.open_many()
        many.resume("r", session_id, after_seq=10**9)
        ref, event = next(iter(many))
        assert (ref, event.error.code, event.error.field) == (
            "r", "INVALID_ARGUMENT", "resume.after_seq")
        many.cancel()
        # the session still takes a resume that is in range
        again = client.resume_session(session_id, after_seq=0)
        assert next(iter(again)).opened.session_id == session_id
        again.detach()
        fuzz_daemon.resume_stream.detach()
    finally:
        client.destroy_sandbox(fuzz_daemon.resume_sandbox.id)


def test_health_is_served_after_the_fuzz(fuzz_daemon):
    assert fuzz_daemon.health() == health_pb2.HealthCheckResponse.ServingStatus.Name(
        health_pb2.HealthCheckResponse.SERVING)


def test_what_the_fuzz_found_stays_fixed(fuzz_daemon):
    """Two findings of the fuzz, pinned: an unknown TaskState, and an after_seq past what
    SQLite stores (both were INTERNAL)."""
    with grpc.insecure_channel(f"unix:{fuzz_daemon.socket}") as channel:
        tasks = channel.unary_unary("/corral.v1.Tasks/List",
                                    request_serializer=task_pb2.ListTasksRequest.SerializeToString)
        with pytest.raises(grpc.RpcError) as exc:
            tasks(task_pb2.ListTasksRequest(state=189), timeout=5)
        assert (exc.value.code(), exc.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "state: 189 is not a TaskState value")
        query = channel.unary_unary(
            "/corral.v1.Audit/Query",
            request_serializer=audit_pb2.AuditQueryRequest.SerializeToString,
            response_deserializer=audit_pb2.AuditQueryResponse.FromString)
        assert list(query(audit_pb2.AuditQueryRequest(after_seq=2**64 - 1), timeout=5)
                    .records) == []
