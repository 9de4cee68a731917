"""Batches from take() decode with the generated corral.v1 classes to exactly what was fed."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.v1 import stream_pb2

from .test_stream_core import IMPLS, batch_entries, load_impl

TOKEN, TURN_END, CHECKPOINT, LOG = 1, 2, 4, 6


@pytest.fixture(params=IMPLS)
def impl(request):
    return load_impl(request.param)  # a module: nothing to reset between hypothesis examples


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("<IB", len(payload), kind) + payload


items = st.lists(st.one_of(
    st.text(max_size=8).map(lambda t: (TOKEN, t.encode())),
    st.text(max_size=8).map(lambda t: (TOKEN, t.encode())),
    st.text(max_size=8).map(lambda t: (LOG, t.encode())),
    st.binary(max_size=8).map(lambda b: (CHECKPOINT, b)),
    st.sampled_from(["completed", "interrupted", "failed"]).map(
        lambda s: (TURN_END, json.dumps({"status": s}).encode())),
), max_size=60)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fed=items, cuts=st.lists(st.integers(0, 2000), max_size=10),
       sizes=st.lists(st.integers(1, 400), min_size=1, max_size=5))
def test_batches_round_trip_through_the_generated_classes(impl, fed, cuts, sizes):
    data = b"".join(_frame(kind, payload) for kind, payload in fed)
    stream = impl.TokenStream()
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        stream.feed(data[a:b])
    cursor = stream.subscribe()
    got = []
    turn = 0
    while (raw := stream.take(cursor, size := sizes[turn % len(sizes)])) is not None:
        entries, batch = batch_entries(raw)
        assert batch.first_seq == len(got) + 1
        assert batch.end_seq == len(fed) + 1
        assert len(raw) <= size or len(entries) == 1
        got.extend(entries)
        turn += 1
    assert [(seq, kind, payload) for seq, kind, payload, _, _ in got] == [
        (seq, kind, payload) for seq, (kind, payload) in enumerate(fed, 1)]


@pytest.mark.parametrize("length", [0, 1, 127, 128, 16383, 16384, 2_097_152])
def test_varint_boundaries_in_lengths(impl, length):
    text = b"z" * length
    stream = impl.TokenStream(max_frame_bytes=4 << 20, log_bytes=16 << 20)
    stream.feed(_frame(TOKEN, b"a") + _frame(TOKEN, text) + _frame(LOG, text))
    entries, batch = batch_entries(stream.take(stream.subscribe(), 8 << 20))
    assert [e[2] for e in entries] == [b"a", text, text]
    assert list(batch.lengths) == [1, length]


def test_varint_boundaries_in_seqs(impl):
    stream = impl.TokenStream()
    stream.feed(b"".join(_frame(TOKEN, b"%d" % i) for i in range(20_000)))
    stream.feed(_frame(LOG, b"after"))
    cursor = stream.subscribe(16_380)
    entries, batch = batch_entries(stream.take(cursor, 1 << 20))
    assert batch.first_seq == 16_380 and batch.end_seq == 20_002
    assert [e[0] for e in entries] == list(range(16_380, 20_002))
    assert entries[-1] == (20_001, stream_pb2.EVENT_KIND_LOG, b"after", 0, "")
    assert entries[0][2] == b"16379"


def test_lost_notice_decodes(impl):
    stream = impl.TokenStream(log_bytes=200)
    cursor = stream.subscribe()
    stream.feed(b"".join(_frame(TOKEN, b"%03d" % i) for i in range(300)))
    raw = stream.take(cursor)
    batch = stream_pb2.StreamBatch.FromString(raw)
    assert batch.SerializeToString() == raw
    assert batch.lost == stream_pb2.DataLost(first_lost_seq=1, count=290)
    assert batch.first_seq == 291 and list(batch.lengths) == [3] * 10
