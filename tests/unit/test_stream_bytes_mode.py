"""The token core's bytes mode (exec output), on both implementations: byte-exact, one
entry per feed, whatever the bytes are."""

from __future__ import annotations

import os

import pytest

from corral.v1 import stream_pb2

from .test_stream_core import IMPLS, load_impl

BINARY = bytes(range(256)) * 4 + b"\xff\xfe\xc3" + os.urandom(4096) + b"\xe2\x82"


@pytest.fixture(params=IMPLS)
def impl(request):
    return load_impl(request.param)


def _drain(stream, cursor) -> tuple[bytes, list[int]]:
    out, lengths = bytearray(), []
    while True:
        raw = stream.take(cursor, 1 << 20)
        if raw is None:
            return bytes(out), lengths
        batch = stream_pb2.StreamBatch.FromString(raw)
        out += batch.text
        lengths += list(batch.lengths)


@pytest.mark.parametrize("split", [1, 7, 4096, len(BINARY)])
def test_bytes_mode_keeps_every_byte_as_fed(impl, split):
    stream = impl.TokenStream("bytes", log_bytes=1 << 24)
    cursor = stream.subscribe()
    pieces = [BINARY[i:i + split] for i in range(0, len(BINARY), split)]
    appended = [stream.feed(piece) for piece in pieces]
    assert stream.close() == 0  # nothing held back: no code point to finish
    data, lengths = _drain(stream, cursor)
    assert data == BINARY
    assert lengths == [len(p) for p in pieces]
    assert appended == [1] * len(pieces)
    stats = stream.statistics()
    assert (stats.mode, stats.tokens, stats.token_bytes, stats.errors) == (
        "bytes", len(pieces), len(BINARY), 0)
    assert stream.next_event() is None


def test_bytes_mode_empty_feed_appends_nothing(impl):
    stream = impl.TokenStream("bytes")
    assert stream.feed(b"") == 0
    assert stream.next_seq == 1


def test_unknown_mode_names_the_three(impl):
    with pytest.raises(ValueError, match=r"^mode must be 'frames', 'text' or 'bytes', not 'raw'$"):
        impl.TokenStream("raw")


def test_bytes_mode_evicts_like_the_others(impl):
    stream = impl.TokenStream("bytes", log_bytes=3 * (1000 + impl.ENTRY_OVERHEAD))
    cursor = stream.subscribe()
    for i in range(5):
        stream.feed(bytes([i]) * 1000)
    batch = stream_pb2.StreamBatch.FromString(stream.take(cursor, 1 << 20))
    assert (batch.lost.first_lost_seq, batch.lost.count, batch.first_seq) == (1, 2, 3)
    assert batch.text == bytes([2]) * 1000 + bytes([3]) * 1000 + bytes([4]) * 1000
