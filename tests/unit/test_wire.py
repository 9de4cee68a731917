"""Hand-made protobuf framing around pre-encoded batches decodes with the generated classes."""

import pytest

from corral.runtime.api.wire import field_bytes, field_varint, first_seq, varint
from corral.v1 import sandbox_pb2, session_pb2, stream_pb2


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**63 - 1])
def test_first_seq_reads_the_leading_varint(n):
    raw = stream_pb2.StreamBatch(first_seq=n, text=b"ab", lengths=[2]).SerializeToString()
    assert first_seq(raw) == n


def test_first_seq_of_garbage_is_zero():
    assert first_seq(b"") == 0
    assert first_seq(b"\x12\x00") == 0  # starts with another field
    assert first_seq(b"\x08\xff\xff") == 0  # truncated varint


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 2**56])
def test_varint_round_trip(n):
    msg = stream_pb2.StreamBatch.FromString(field_varint(1, n) + field_bytes(2, b"xy"))
    assert (msg.first_seq, msg.text) == (n, b"xy")
    assert varint(n)[-1] < 0x80 and all(b >= 0x80 for b in varint(n)[:-1])


def test_session_and_exec_events_wrap_a_batch():
    batch = stream_pb2.StreamBatch(first_seq=7, text="héllo".encode(), lengths=[3, 3])
    raw = batch.SerializeToString()
    event = session_pb2.SessionEvent.FromString(field_bytes(2, raw))
    assert event.WhichOneof("event") == "batch" and event.batch == batch
    out = sandbox_pb2.ExecEvent.FromString(field_bytes(2, field_varint(1, 2) + field_bytes(2, raw)))
    assert out.output.stream == sandbox_pb2.OUTPUT_STREAM_STDERR and out.output.batch == batch
