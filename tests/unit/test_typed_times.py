"""Typed times beside the deprecated numbers (issue #17): the pairing the daemon relies on
(runtime/api/wire.py: each deprecated number of seconds is declared right before its
Timestamp or Duration) holds in every message of the API, and the copy each way keeps the
value, refuses disagreement naming the typed field, and leaves "0 = unset" alone."""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
from google.protobuf.descriptor import FieldDescriptor

from corral.runtime.api import wire
from corral.v1 import audit_pb2, sandbox_pb2, session_pb2, task_pb2

#: Every .proto of the API.
PROTO_FILES = ("audit", "image", "sandbox", "session", "snapshot", "stream", "task")

TYPED = {"google.protobuf.Timestamp", "google.protobuf.Duration"}
NUMBERS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_UINT32}


def _messages():
    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)

    for name in PROTO_FILES:
        module = importlib.import_module(f"corral.v1.{name}_pb2")
        for desc in module.DESCRIPTOR.message_types_by_name.values():
            yield from walk(desc)


def test_every_deprecated_time_has_its_typed_partner_and_back():
    pairs, lonely = 0, []
    for desc in _messages():
        fields = list(desc.fields)
        for i, field in enumerate(fields):
            typed = field.message_type is not None and field.message_type.full_name in TYPED
            if field.GetOptions().deprecated:
                after = fields[i + 1] if i + 1 < len(fields) else None
                ok = (field.type in NUMBERS and after is not None and after.message_type
                      is not None and after.message_type.full_name in TYPED)
                pairs += ok
                if not ok:
                    lonely.append(field.full_name)
            elif typed and (i == 0 or not fields[i - 1].GetOptions().deprecated):
                lonely.append(field.full_name)
    assert lonely == []
    assert pairs >= 18


def test_an_answer_gets_both_forms_and_zero_stays_unset():
    sb = sandbox_pb2.Sandbox(created_at=1_700_000_000.25,
                             spec=sandbox_pb2.SandboxSpec(ttl_s=600))
    wire.fill_typed(sb)
    assert sb.create_time.ToMicroseconds() == 1_700_000_000_250_000
    assert sb.spec.ttl.ToTimedelta() == timedelta(seconds=600)
    assert not sb.HasField("expire_time") and not sb.HasField("pause_time")
    listing = sandbox_pb2.ListFilesResponse(entries=[sandbox_pb2.FileEntry(mtime=2.5)])
    wire.fill_typed(listing)
    assert listing.entries[0].modify_time.ToMilliseconds() == 2500
    beyond = wire.fill_typed(sandbox_pb2.FileEntry(mtime=1e17))  # after year 9999
    assert (beyond.mtime, beyond.HasField("modify_time")) == (1e17, False)


def test_a_request_may_send_the_typed_form_alone():
    request = sandbox_pb2.CreateSandboxRequest(spec=sandbox_pb2.SandboxSpec(
        ttl=timedelta(seconds=1.2), command_timeout=timedelta(milliseconds=1500)))
    wire.accept_typed(request)
    assert (request.spec.ttl_s, request.spec.command_timeout_s) == (2, 1.5)  # ttl: rounded up
    submit = task_pb2.SubmitTaskRequest()
    submit.spec.sandbox.ttl.FromSeconds(30)
    wire.accept_typed(submit)
    assert submit.spec.sandbox.ttl_s == 30


@pytest.mark.parametrize(("request_", "message"), [
    (sandbox_pb2.SetTimeoutRequest(ttl_s=5, ttl=timedelta(seconds=6)),
     "ttl: 6.0s differs from the deprecated ttl_s (5); set one of them"),
    (sandbox_pb2.ExecRequest(timeout=timedelta(seconds=-2)),
     "timeout: -2.0s must not be negative"),
    (sandbox_pb2.SetTimeoutRequest(ttl=timedelta(days=60_000)),
     "ttl: 5184000000 seconds is over the limit of 4294967295"),
    (audit_pb2.AuditQueryRequest(until_time={"seconds": 1 << 62}),
     f"until_time: Timestamp is not valid: Seconds {1 << 62} must be in range "
     "[-62135596800, 253402300799]"),
    (session_pb2.SessionRequest(start=session_pb2.SessionStart(
        spec=sandbox_pb2.SandboxSpec(command_timeout_s=1, command_timeout=timedelta(2)))),
     "start.spec.command_timeout: 172800.0s differs from the deprecated command_timeout_s "
     "(1.0); set one of them"),
])
def test_a_disagreement_is_refused_naming_the_typed_field(request_, message):
    with pytest.raises(wire.FieldRefused) as caught:
        wire.accept_typed(request_)
    assert str(caught.value) == message


def test_the_deserializer_refuses_before_the_servicer():
    data = sandbox_pb2.ExecRequest(timeout_s=1, timeout=timedelta(seconds=3)).SerializeToString()
    refused = wire._request_deserializer(sandbox_pb2.ExecRequest)(data)
    assert isinstance(refused, wire.Refused)
    assert refused.message.startswith("timeout: 3.0s differs from the deprecated timeout_s")


def test_huge_or_nan_numbers_beside_a_typed_time_are_refused_not_crashed():
    # found by tests/integration/test_api_fuzz.py: 1.8e302 * 10**6 is inf
    for number in (1.8e302, float("inf"), float("nan")):
        request = audit_pb2.AuditQueryRequest(until=number, until_time={})
        with pytest.raises(wire.FieldRefused, match=r"^until_time: 0\.0s differs"):
            wire.accept_typed(request)
