"""Differential test: the compiled token core against its Python twin on random input.

Random frame streams (good, malformed, oversize, garbage), random split points, random
subscribers with random read sizes and speeds, random log budgets: both implementations must
return identical feed counts, events, batches (byte for byte), errors and statistics.
"""

from __future__ import annotations

import importlib
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

oracle = importlib.import_module("corral.ext._stream_py")
try:
    compiled = importlib.import_module("corral.ext._stream")
except ImportError:  # pragma: no cover - only when the extension is not built
    compiled = None

pytestmark = pytest.mark.skipif(compiled is None,
                                reason="corral.ext._stream is not built (run `make ext`)")

# CORRAL_FUZZ_EXAMPLES raises the count for a long local run; CI uses the default.
FUZZ = settings(max_examples=int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _frame(frame_type: int, payload: bytes) -> bytes:
    return struct.pack("<IB", len(payload), frame_type) + payload


utf8_text = st.text(st.characters(codec="utf-8"), max_size=6).map(str.encode)
raw_bytes = st.binary(max_size=12)
# byte strings built from UTF-8 pieces, cut and mixed with stray bytes
utf8_fragments = st.lists(
    st.one_of(utf8_text, raw_bytes, st.sampled_from(
        [b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80", b"\xed\xa0\x80", b"\xc0", b"\x80"])),
    max_size=6).map(b"".join)
json_payload = st.one_of(
    st.dictionaries(st.sampled_from(["status", "done", "x"]),
                    st.one_of(st.integers(), st.text(max_size=5), st.none()),
                    max_size=3).map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"", b"[]", b'"s"', b"{", b"nul", b'{"status": "ok"}', b"1e400"]),
    utf8_fragments,
)
good_token = utf8_text.map(lambda p: _frame(1, p))
frames = st.one_of(
    good_token, good_token, good_token, good_token,  # mostly tokens, as in real streams
    utf8_fragments.map(lambda p: _frame(1, p)),
    st.tuples(st.sampled_from([2, 3, 5, 7]), json_payload).map(lambda t: _frame(*t)),
    st.tuples(st.sampled_from([4, 6]), utf8_fragments).map(lambda t: _frame(*t)),
    st.tuples(st.sampled_from([0, 8, 0x40, 0x81, 0xFF]), raw_bytes).map(lambda t: _frame(*t)),
)
# a stream of frames, sometimes with garbage (which usually loses framing) somewhere in it
no_garbage = st.just([])
frame_streams = st.tuples(st.integers(0, 40).flatmap(
                              lambda n: st.lists(frames, min_size=n, max_size=n)),
                          st.one_of(no_garbage, no_garbage, no_garbage,
                                    st.lists(raw_bytes, min_size=1, max_size=1)),
                          st.integers(0, 40)).map(
    lambda t: b"".join(t[0][:t[2]] + t[1] + t[0][t[2]:]))


@st.composite
def schedules(draw, data_strategy):
    data = draw(data_strategy)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    subscribers = draw(st.lists(
        st.tuples(st.sampled_from([None, 1, 3]),  # from_seq at subscribe time
                  st.sampled_from([1, 70, 80, 100, 200, 1 << 16])),  # max_bytes per take
        min_size=1, max_size=3))
    steps = []
    for _ in range(len(cuts) + 1):
        takes = draw(st.lists(st.integers(0, len(subscribers) - 1), max_size=4))
        steps.append((takes, draw(st.booleans())))
    return data, cuts, subscribers, steps


def run(impl, mode: str, log_bytes: int, max_frame: int, schedule) -> list:
    """Drive one implementation through a schedule; returns everything it said."""
    data, cuts, subscribers, steps = schedule
    stream = impl.TokenStream(mode, log_bytes=log_bytes, max_frame_bytes=max_frame)
    said: list = []
    cursors = []
    bounds = [0, *cuts, len(data)]
    for i, (takes, pull) in enumerate(steps):
        said.append(("feed", stream.feed(data[bounds[i]:bounds[i + 1]])))
        if i == 0:
            for from_seq, _ in subscribers:
                from_seq = None if from_seq is None else min(from_seq, stream.next_seq)
                cursors.append(stream.subscribe(from_seq))
        for index in takes:
            said.append(("take", index, stream.take(cursors[index], subscribers[index][1])))
        if pull:
            said.append(("event", stream.next_event()))
        said.append(("stats", stream.statistics()))
    said.append(("close", stream.close()))
    for index, cursor in enumerate(cursors):
        while (batch := stream.take(cursor, subscribers[index][1])) is not None:
            said.append(("drain", index, batch))
        said.append(("cursor", cursor.statistics()))
    said.append(("events", list(iter(stream.next_event, None))))
    said.append(("log", [stream.get(s) for s in range(stream.first_seq, stream.next_seq)]))
    said.append(("stats", stream.statistics()))
    return said


@FUZZ
@given(schedule=schedules(frame_streams),
       log_bytes=st.sampled_from([1, 60, 300, 4096, 1 << 20, 1 << 20]),
       max_frame=st.sampled_from([6, 64, 1 << 20, 1 << 20, 1 << 20, 1 << 20]))
def test_frames_differential(schedule, log_bytes, max_frame):
    expected = run(oracle, "frames", log_bytes, max_frame, schedule)
    got = run(compiled, "frames", log_bytes, max_frame, schedule)
    assert got == expected


@FUZZ
@given(schedule=schedules(st.lists(utf8_fragments, max_size=8).map(b"".join)),
       log_bytes=st.sampled_from([1, 60, 1 << 20]))
def test_text_differential(schedule, log_bytes):
    expected = run(oracle, "text", log_bytes, 1 << 20, schedule)
    got = run(compiled, "text", log_bytes, 1 << 20, schedule)
    assert got == expected


@FUZZ
@given(schedule=schedules(st.binary(max_size=64)),
       log_bytes=st.sampled_from([1, 60, 1 << 20]))
def test_bytes_differential(schedule, log_bytes):
    expected = run(oracle, "bytes", log_bytes, 1 << 20, schedule)
    got = run(compiled, "bytes", log_bytes, 1 << 20, schedule)
    assert got == expected


@FUZZ
@given(payload=st.binary(max_size=40))
def test_utf8_verdicts_match_python(payload):
    """Both cores accept exactly what Python's strict decoder accepts, and cite its offset."""
    try:
        payload.decode("utf-8")
        expected = None
    except UnicodeDecodeError as exc:
        expected = exc.start
    for impl in (oracle, compiled):
        stream = impl.TokenStream()
        stream.feed(_frame(1, payload))
        event = stream.get(1)
        if expected is None:
            assert event.payload == payload
        else:
            assert event.message == (f"frame at byte 0: TOKEN payload is not valid UTF-8 "
                                     f"(byte {expected} of the payload); frame skipped")


@FUZZ
@given(data=st.binary(max_size=60), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_text_mode_matches_python_replace(data, cuts):
    """Whatever the reads, text mode yields what bytes.decode('utf-8', 'replace') yields."""
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for impl in (oracle, compiled):
        stream = impl.TokenStream("text")
        for a, b in zip(bounds, bounds[1:], strict=False):
            stream.feed(data[a:b])
        stream.close()
        chunks = [stream.get(s).payload for s in range(1, stream.next_seq)]
        assert b"".join(chunks).decode() == data.decode("utf-8", "replace")
        assert all(chunk.decode() for chunk in chunks)
