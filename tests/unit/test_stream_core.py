"""The token core's table of cases, run against both implementations (compiled and oracle).

Each frames case is fed whole, byte by byte, and (where it ends on a frame boundary) followed
by trailing garbage, h11 style; the outcome must not depend on how the bytes were split.
"""

from __future__ import annotations

import importlib
import json
import struct
from dataclasses import dataclass, field

import pytest

from corral.v1 import stream_pb2

IMPLS = ["python", "cython"]


def load_impl(name: str):
    if name == "python":
        return importlib.import_module("corral.ext._stream_py")
    try:
        return importlib.import_module("corral.ext._stream")
    except ImportError:
        pytest.skip("corral.ext._stream is not built (run `make ext`)")


@pytest.fixture(params=IMPLS)
def impl(request):
    return load_impl(request.param)


def frame(frame_type: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IB", len(payload), frame_type) + payload


def tok(text: str) -> bytes:
    return frame(0x01, text.encode())


def jframe(frame_type: int, obj) -> bytes:
    return frame(frame_type, json.dumps(obj).encode())


TOKEN, TURN_END, PROGRESS, CHECKPOINT, RESULT, LOG, TOOL_CALL, ERROR = 1, 2, 3, 4, 5, 6, 7, 64
FRAME_TOO_LARGE, UNKNOWN_FRAME_TYPE, BAD_UTF8, BAD_JSON, TRUNCATED_FRAME = 1, 2, 3, 4, 5


def T(text: str):
    return (TOKEN, text.encode(), 0, "")


def E(kind: int, payload: bytes):
    return (kind, payload, 0, "")


def Err(code: int, message: str):
    return (ERROR, b"", code, message)


@dataclass
class Case:
    name: str
    data: bytes
    expected: list  # (kind, payload, error, message) per log entry, seq 1, 2, ...
    max_frame_bytes: int = 1 << 20
    fatal: bool = False  # framing is lost by the end of data
    on_boundary: bool = True  # data ends between frames
    extra: dict = field(default_factory=dict)


def _cases() -> list[Case]:
    hello = tok("hel") + tok("lo")
    bad_token = frame(0x01, b"a\xffb")
    return [
        Case("empty input", b"", []),
        Case("one token", tok("hi"), [T("hi")]),
        Case("tokens of every UTF-8 width", tok("a") + tok("é") + tok("€") + tok("🙂"),
             [T("a"), T("é"), T("€"), T("🙂")]),
        Case("empty token", tok("") + tok("x"), [T(""), T("x")]),
        Case("turn end", hello + jframe(0x02, {"status": "completed"}),
             [T("hel"), T("lo"), E(TURN_END, b'{"status": "completed"}')]),
        Case("every event kind",
             jframe(0x03, {"done": 1, "total": 3})
             + frame(0x04, b"\x00\xffstate")
             + jframe(0x05, {"answer": 42})
             + frame(0x06, "warn: ünïcode".encode())
             + jframe(0x07, {"name": "grep", "arguments": {"q": "x"}})
             + frame(0x04, b""),
             [E(PROGRESS, b'{"done": 1, "total": 3}'), E(CHECKPOINT, b"\x00\xffstate"),
              E(RESULT, b'{"answer": 42}'), E(LOG, "warn: ünïcode".encode()),
              E(TOOL_CALL, b'{"name": "grep", "arguments": {"q": "x"}}'), E(CHECKPOINT, b"")]),
        Case("bad UTF-8 token is skipped", tok("a") + bad_token + tok("b"),
             [T("a"), Err(BAD_UTF8, "frame at byte 6: TOKEN payload is not valid UTF-8 "
                                    "(byte 1 of the payload); frame skipped"), T("b")]),
        Case("surrogate in a token", frame(0x01, b"\xed\xa0\x80"),
             [Err(BAD_UTF8, "frame at byte 0: TOKEN payload is not valid UTF-8 "
                            "(byte 0 of the payload); frame skipped")]),
        Case("overlong encoding in a token", frame(0x01, b"ab\xc0\xaf"),
             [Err(BAD_UTF8, "frame at byte 0: TOKEN payload is not valid UTF-8 "
                            "(byte 2 of the payload); frame skipped")]),
        Case("code point cut at the end of a token", frame(0x01, b"x\xe2\x82") + tok("y"),
             [Err(BAD_UTF8, "frame at byte 0: TOKEN payload is not valid UTF-8 "
                            "(byte 1 of the payload); frame skipped"), T("y")]),
        Case("above U+10FFFF in a token", frame(0x01, b"\xf4\x90\x80\x80"),
             [Err(BAD_UTF8, "frame at byte 0: TOKEN payload is not valid UTF-8 "
                            "(byte 0 of the payload); frame skipped")]),
        Case("unknown frame type is skipped", tok("a") + frame(0x09, b"xyz") + tok("b"),
             [T("a"), Err(UNKNOWN_FRAME_TYPE, "frame at byte 6: unknown frame type 0x09; "
                                              "its 3-byte payload is skipped"), T("b")]),
        Case("control frame on the events fd", frame(0x81, b"hi") + tok("b"),
             [Err(UNKNOWN_FRAME_TYPE, "frame at byte 0: unknown frame type 0x81; "
                                      "its 2-byte payload is skipped"), T("b")]),
        Case("frame type zero", frame(0x00),
             [Err(UNKNOWN_FRAME_TYPE, "frame at byte 0: unknown frame type 0x00; "
                                      "its 0-byte payload is skipped")]),
        Case("frame at the size limit", tok("abcd") + tok("abcdefgh"),
             [T("abcd"), T("abcdefgh")], max_frame_bytes=8),
        Case("oversize frame loses framing", tok("ok") + tok("abcdefghi") + tok("never"),
             [T("ok"), Err(FRAME_TOO_LARGE,
                           "frame at byte 7: length 9 exceeds the 8-byte frame limit; "
                           "framing is lost, the rest of the stream is ignored")],
             max_frame_bytes=8, fatal=True),
        Case("oversize header with no payload yet", tok("ok") + struct.pack("<IB", 1 << 31, 1),
             [T("ok"), Err(FRAME_TOO_LARGE,
                           "frame at byte 7: length 2147483648 exceeds the 1048576-byte frame "
                           "limit; framing is lost, the rest of the stream is ignored")],
             fatal=True),
        Case("turn end without status", jframe(0x02, {"state": "done"}),
             [Err(BAD_JSON, 'frame at byte 0: TURN_END payload has no string "status"; '
                            "frame skipped")]),
        Case("turn end with a number status", jframe(0x02, {"status": 3}) + tok("z"),
             [Err(BAD_JSON, 'frame at byte 0: TURN_END payload has no string "status"; '
                            "frame skipped"), T("z")]),
        Case("progress that is not JSON", frame(0x03, b"50%"),
             [Err(BAD_JSON, "frame at byte 0: PROGRESS payload is not valid JSON "
                            "(Extra data at character 2); frame skipped")]),
        Case("empty result", frame(0x05),
             [Err(BAD_JSON, "frame at byte 0: RESULT payload is not valid JSON "
                            "(Expecting value at character 0); frame skipped")]),
        Case("result that is an array", jframe(0x05, [1, 2]),
             [Err(BAD_JSON, "frame at byte 0: RESULT payload is not a JSON object "
                            "(it is a JSON array); frame skipped")]),
        Case("tool call that is a string", jframe(0x07, "grep"),
             [Err(BAD_JSON, "frame at byte 0: TOOL_CALL payload is not a JSON object "
                            "(it is a JSON string); frame skipped")]),
        Case("progress in UTF-16 is not UTF-8", frame(0x03, '{"a":1}'.encode("utf-16")),
             [Err(BAD_UTF8, "frame at byte 0: PROGRESS payload is not valid UTF-8 "
                            "(byte 0 of the payload); frame skipped")]),
        Case("log that is not UTF-8", frame(0x06, b"\x80"),
             [Err(BAD_UTF8, "frame at byte 0: LOG payload is not valid UTF-8 "
                            "(byte 0 of the payload); frame skipped")]),
        Case("stream ends inside a payload", tok("a") + frame(0x01, b"abcdef")[:8],
             [T("a"), Err(TRUNCATED_FRAME,
                          "stream ended inside the frame at byte 6 (type 0x01, length 6): "
                          "8 of 11 bytes received")], on_boundary=False),
        Case("stream ends inside a header", tok("a") + b"\x03\x00",
             [T("a"), Err(TRUNCATED_FRAME, "stream ended inside the frame header at byte 6: "
                                           "2 of 5 bytes received")], on_boundary=False),
    ]


CASES = _cases()
GARBAGE = b"\xde\xad\xbe\xef\x01 not a frame at all"


def _splits(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    return [data[i:i + 1] for i in range(len(data))]


def _entries(stream) -> list[tuple]:
    return [tuple(stream.get(seq))[1:] for seq in range(stream.first_seq, stream.next_seq)]


def batch_entries(raw: bytes) -> tuple[list[tuple], stream_pb2.StreamBatch]:
    """(seq, kind, payload, error, message) for every entry of one encoded batch."""
    batch = stream_pb2.StreamBatch.FromString(raw)
    assert batch.SerializeToString() == raw, "batch is not in canonical wire form"
    events = {event.seq: event for event in batch.events}
    out = []
    pos = 0
    lengths = iter(batch.lengths)
    for seq in range(batch.first_seq, batch.first_seq + len(batch.lengths) + len(events)):
        if seq in events:
            ev = events.pop(seq)
            out.append((seq, ev.kind, ev.payload, ev.error, ev.message))
        else:
            n = next(lengths)
            out.append((seq, TOKEN, batch.text[pos:pos + n], 0, ""))
            pos += n
    assert not events and pos == len(batch.text)
    return out, batch


def check_views_agree(stream, expected: list[tuple]) -> None:
    """get(), next_event() and a full take() must all tell the same story."""
    assert _entries(stream) == expected
    pulled = []
    while (event := stream.next_event()) is not None:
        pulled.append(event)
    assert [tuple(e)[1:] for e in pulled] == [e for e in expected if e[0] != TOKEN]
    assert [e.seq for e in pulled] == [
        seq for seq, e in enumerate(expected, 1) if e[0] != TOKEN]
    cursor = stream.subscribe()
    raw = stream.take(cursor, 1 << 30)
    if not expected:
        assert raw is None
        return
    got, batch = batch_entries(raw)
    assert [entry[1:] for entry in got] == expected
    assert batch.first_seq == 1 and batch.end_seq == len(expected) + 1
    assert stream.take(cursor) is None


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_frames_case(impl, case: Case, how: str):
    stream = impl.TokenStream("frames", max_frame_bytes=case.max_frame_bytes)
    appended = sum(stream.feed(part) for part in _splits(case.data, how))
    appended += stream.close()
    assert appended == len(case.expected)
    check_views_agree(stream, case.expected)
    stats = stream.statistics()
    assert stats.failed is case.fatal
    assert stats.bytes_fed == len(case.data)
    assert stats.next_seq == len(case.expected) + 1
    assert stats.errors == sum(1 for e in case.expected if e[0] == ERROR)
    assert stats.tokens == sum(1 for e in case.expected if e[0] == TOKEN)


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("case", [c for c in CASES if c.on_boundary],
                         ids=[c.name for c in CASES if c.on_boundary])
def test_frames_case_with_trailing_garbage(impl, case: Case, how: str):
    stream = impl.TokenStream("frames", max_frame_bytes=case.max_frame_bytes)
    for part in _splits(case.data, how):
        stream.feed(part)
    assert _entries(stream) == case.expected  # nothing waits for more bytes
    for part in _splits(GARBAGE, how):
        stream.feed(part)
    stream.close()
    expected = list(case.expected)
    if not case.fatal:
        expected.append(Err(FRAME_TOO_LARGE,
                            f"frame at byte {len(case.data)}: length 4022250974 exceeds the "
                            f"{case.max_frame_bytes}-byte frame limit; framing is lost, the "
                            f"rest of the stream is ignored"))
    check_views_agree(stream, expected)
    stats = stream.statistics()
    assert stats.failed
    assert stats.bytes_fed == len(case.data) + len(GARBAGE)
    if case.fatal:
        assert stats.bytes_discarded >= len(GARBAGE)
    else:
        assert stats.bytes_discarded == len(GARBAGE)


TEXT_CASES = [
    ("empty", b"", ""),
    ("ascii", b"hello world\n", "hello world\n"),
    ("every width", "aé€🙂z".encode(), "aé€🙂z"),
    ("lone continuation byte", b"a\x80b", "a\ufffdb"),
    ("invalid start bytes", b"\xc0\xaf\xff", "\ufffd\ufffd\ufffd"),
    ("surrogate", b"\xed\xa0\x80x", "\ufffd\ufffd\ufffdx"),
    ("overlong three-byte", b"\xe0\x80\xaf", "\ufffd\ufffd\ufffd"),
    ("above U+10FFFF", b"\xf4\x90\x80\x80", "\ufffd\ufffd\ufffd\ufffd"),
    ("truncated sequence followed by text", b"\xe2\x82x", "\ufffdx"),
    ("four-byte prefix cut by a byte", b"\xf0\x9f\x98A", "\ufffdA"),
    ("stream ends inside a code point", b"ok\xf0\x9f\x98", "ok\ufffd"),
    ("stream ends after a lead byte", b"\xe2", "\ufffd"),
]


@pytest.mark.parametrize("how", ["whole", "bytewise", "garbage"])
@pytest.mark.parametrize("name,data,text", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_case(impl, name: str, data: bytes, text: str, how: str):
    stream = impl.TokenStream("text")
    parts = _splits(data, "whole" if how == "garbage" else how)
    if how == "garbage":
        parts.append(b"\xff")
        text += "\ufffd"  # a cut sequence and the stray byte each become one U+FFFD
    counts = [stream.feed(part) for part in parts]
    counts.append(stream.close())
    chunks = [e[1] for e in _entries(stream)]
    assert sum(counts) == len(chunks)
    assert all(e[0] == TOKEN for e in _entries(stream))
    for chunk in chunks:
        chunk.decode("utf-8")  # every chunk stands alone: no code point is ever split
        assert chunk
    assert b"".join(chunks).decode() == text
    if how == "whole":
        assert data.decode("utf-8", "replace") == text
        assert len(chunks) <= 2
    assert stream.next_event() is None
    stats = stream.statistics()
    assert stats.mode == "text" and stats.tokens == len(chunks) and stats.errors == 0


def test_text_mode_holds_back_a_partial_code_point(impl):
    stream = impl.TokenStream("text")
    assert stream.feed(b"ab\xe2\x82") == 1
    assert stream.get(1).payload == b"ab"
    assert stream.feed(b"\xac") == 1
    assert stream.get(2).payload == "€".encode()
    assert stream.feed(b"\xf0") == 0
    assert stream.close() == 1
    assert stream.get(3).payload == "\ufffd".encode()


def test_text_mode_ignores_frame_bytes(impl):
    stream = impl.TokenStream("text")
    stream.feed(tok("hi"))
    assert stream.get(1).payload == b"\x02\x00\x00\x00\x01hi"


# --- the log, cursors and batches ---------------------------------------------------------


def test_seq_starts_at_one_and_grows_by_one(impl):
    stream = impl.TokenStream()
    assert (stream.first_seq, stream.next_seq) == (1, 1)
    stream.feed(tok("a") + jframe(0x03, {}) + frame(0x42) + tok("b"))
    assert [stream.get(s).seq for s in range(1, 5)] == [1, 2, 3, 4]
    assert [e.seq for e in iter(stream.next_event, None)] == [2, 3]
    assert stream.next_seq == 5


def test_events_are_stream_event_tuples(impl):
    stream = impl.TokenStream()
    stream.feed(jframe(0x02, {"status": "interrupted"}))
    event = stream.next_event()
    assert event == (1, impl.EventKind.TURN_END, b'{"status": "interrupted"}',
                     impl.ErrorCode.NONE, "")
    assert event.kind is impl.EventKind.TURN_END
    assert event.error is impl.ErrorCode.NONE
    assert json.loads(event.payload) == {"status": "interrupted"}
    assert stream.next_event() is None


def test_eviction_keeps_the_byte_budget(impl):
    stream = impl.TokenStream(log_bytes=100)
    for i in range(20):
        stream.feed(tok(f"t{i:02d}"))  # 3 bytes + 16 overhead = 19 per entry
    stats = stream.statistics()
    assert stats.log_bytes == 95 and stats.log_entries == 5
    assert stats.first_seq == 16 and stats.evicted_entries == 15
    assert stream.get(16).payload == b"t15"
    with pytest.raises(impl.SeqEvictedError,
                       match=r"^seq 15 was evicted from the replay log; "
                             r"the oldest seq still held is 16$") as info:
        stream.get(15)
    assert (info.value.seq, info.value.first_available) == (15, 16)


def test_newest_entry_stays_even_when_larger_than_the_budget(impl):
    stream = impl.TokenStream(log_bytes=32)
    stream.feed(tok("a") + tok("x" * 100))
    assert (stream.first_seq, stream.next_seq) == (2, 3)
    assert stream.statistics().log_bytes == 116
    cursor = stream.subscribe(2)
    got, _ = batch_entries(stream.take(cursor, 10))
    assert got == [(2, TOKEN, b"x" * 100, 0, "")]
    stream.feed(tok("b"))
    assert (stream.first_seq, stream.get(3).payload) == (3, b"b")


def test_get_out_of_range(impl):
    stream = impl.TokenStream()
    stream.feed(tok("a"))
    with pytest.raises(ValueError, match=r"^seq 2 is not written yet; the next seq is 2$"):
        stream.get(2)
    with pytest.raises(ValueError, match=r"^seq must be at least 1, got 0$"):
        stream.get(0)


def test_take_respects_max_bytes(impl):
    stream = impl.TokenStream()
    texts = [f"token{i}" for i in range(500)]
    stream.feed(b"".join(tok(t) for t in texts))
    cursor = stream.subscribe()
    seen = []
    sizes = []
    while (raw := stream.take(cursor, 200)) is not None:
        sizes.append(len(raw))
        got, batch = batch_entries(raw)
        seen.extend(g[2].decode() for g in got)
        assert batch.end_seq == 501
        assert not batch.HasField("lost")
    assert seen == texts
    assert max(sizes) <= 200 and len(sizes) > 10
    assert cursor.next_seq == 501
    assert cursor.statistics() == impl.CursorStatistics(
        next_seq=501, batches=len(sizes), entries=500, bytes=sum(sizes), lost_entries=0)


def test_take_packs_tokens_and_events_in_one_batch(impl):
    stream = impl.TokenStream()
    stream.feed(tok("a") + frame(0x06, b"note") + tok("b") + frame(0x01, b"\xff") + tok("c"))
    raw = stream.take(stream.subscribe())
    batch = stream_pb2.StreamBatch.FromString(raw)
    assert batch.first_seq == 1 and batch.text == b"abc" and list(batch.lengths) == [1, 1, 1]
    assert [(e.seq, e.kind) for e in batch.events] == [
        (2, stream_pb2.EVENT_KIND_LOG), (4, stream_pb2.EVENT_KIND_ERROR)]
    assert batch.events[0].payload == b"note"
    assert batch.events[1].error == stream_pb2.ERROR_CODE_BAD_UTF8
    assert batch.events[1].message == ("frame at byte 21: TOKEN payload is not valid UTF-8 "
                                       "(byte 0 of the payload); frame skipped")


def test_take_always_makes_progress(impl):
    stream = impl.TokenStream()
    stream.feed(tok("x" * 300) + tok("y"))
    cursor = stream.subscribe()
    first = stream.take(cursor, 1)
    assert [g[2] for g in batch_entries(first)[0]] == [b"x" * 300]
    assert [g[2] for g in batch_entries(stream.take(cursor, 1))[0]] == [b"y"]
    assert stream.take(cursor, 1) is None


def test_slow_subscriber_is_told_what_it_lost(impl):
    stream = impl.TokenStream(log_bytes=200)
    fast, slow = stream.subscribe(), stream.subscribe()
    taken = []
    for i in range(50):
        stream.feed(tok(f"{i:03d}"))
        got, _ = batch_entries(stream.take(fast))
        taken.extend(g[2] for g in got)
    assert taken == [f"{i:03d}".encode() for i in range(50)]
    assert stream.statistics().max_lag == 50
    assert stream.statistics().lagged_subscribers == 1  # slow's next entry was evicted
    got, batch = batch_entries(stream.take(slow))
    assert batch.HasField("lost")
    assert (batch.lost.first_lost_seq, batch.lost.count) == (1, 40)
    assert batch.first_seq == 41 == stream.first_seq
    assert [g[2] for g in got] == [f"{i:03d}".encode() for i in range(40, 50)]
    assert slow.statistics().lost_entries == 40
    assert stream.take(slow) is None
    assert stream.statistics().max_lag == 0
    assert stream.statistics().lagged_subscribers == 0


def test_subscribe_from_an_evicted_seq_reports_the_loss(impl):
    stream = impl.TokenStream(log_bytes=40)
    stream.feed(tok("a") + tok("b") + tok("c"))
    cursor = stream.subscribe(1)
    _, batch = batch_entries(stream.take(cursor))
    assert (batch.lost.first_lost_seq, batch.lost.count, batch.first_seq) == (1, 1, 2)


def test_resume_from_a_seq(impl):
    stream = impl.TokenStream()
    stream.feed(b"".join(tok(c) for c in "abcdef"))
    cursor = stream.subscribe(4)
    got, batch = batch_entries(stream.take(cursor))
    assert [g[2] for g in got] == [b"d", b"e", b"f"] and batch.first_seq == 4
    assert stream.take(stream.subscribe(7)) is None


def test_subscribe_rejects_bad_seqs(impl):
    stream = impl.TokenStream()
    stream.feed(tok("a"))
    with pytest.raises(ValueError, match=r"^from_seq 3 is ahead of the stream; "
                                         r"the next seq is 2$"):
        stream.subscribe(3)
    with pytest.raises(ValueError, match=r"^from_seq must be at least 1, got 0$"):
        stream.subscribe(0)


def test_cursor_misuse(impl):
    stream, other = impl.TokenStream(), impl.TokenStream()
    cursor = stream.subscribe()
    with pytest.raises(ValueError, match=r"^cursor belongs to another stream$"):
        other.take(cursor)
    with pytest.raises(ValueError, match=r"^max_bytes must be at least 1, got 0$"):
        stream.take(cursor, 0)
    assert stream.statistics().subscribers == 1
    stream.unsubscribe(cursor)
    stream.unsubscribe(cursor)
    assert stream.statistics().subscribers == 0
    with pytest.raises(ValueError, match=r"^cursor was unsubscribed$"):
        stream.take(cursor)


def test_feed_after_close(impl):
    stream = impl.TokenStream()
    stream.close()
    assert stream.close() == 0
    with pytest.raises(impl.StreamClosedError,
                       match=r"^feed\(\) after close\(\): the stream has ended$"):
        stream.feed(b"x")
    assert stream.statistics().closed


def test_feed_accepts_any_bytes_like(impl):
    stream = impl.TokenStream()
    data = tok("ab") + tok("cd")
    stream.feed(bytearray(data[:4]))
    stream.feed(memoryview(data)[4:])
    assert [stream.get(s).payload for s in (1, 2)] == [b"ab", b"cd"]


def test_append_event(impl):
    stream = impl.TokenStream()
    stream.feed(tok("a") + b"\x05\x00")  # the agent is mid-frame when the runtime steps in
    assert stream.append_event(impl.EventKind.TURN_END, b'{"status": "interrupted"}') == 2
    assert stream.next_event() is None  # its caller already knows
    stream.feed(b"\x00\x00\x01hello")
    assert [stream.get(s).payload for s in (1, 2, 3)] == [
        b"a", b'{"status": "interrupted"}', b"hello"]
    assert stream.statistics().events == 1
    with pytest.raises(ValueError, match=r'^TURN_END payload has no string "status"$'):
        stream.append_event(impl.EventKind.TURN_END, b"{}")
    with pytest.raises(ValueError, match=r"^append_event\(\) takes an event kind from 1 "
                                         r"\(TOKEN\) to 7 \(TOOL_CALL\), got 64$"):
        stream.append_event(impl.EventKind.ERROR, b"x")
    with pytest.raises(ValueError, match=r"^LOG payload is not valid UTF-8 "
                                         r"\(byte 0 of the payload\)$"):
        stream.append_event(impl.EventKind.LOG, b"\xff")


def test_append_token_merges_runtime_text(impl):
    """A plain agent's stdout joins a session stream as tokens, between the agent's frames."""
    stream = impl.TokenStream()
    cursor = stream.subscribe()
    stream.feed(tok("a") + b"\x02\x00")  # mid-frame again
    assert stream.append_event(impl.EventKind.TOKEN, "ü".encode()) == 2
    stream.feed(b"\x00\x00\x01bc")
    batch = stream_pb2.StreamBatch.FromString(stream.take(cursor))
    assert (batch.first_seq, batch.text, list(batch.lengths)) == (1, "aübc".encode(), [1, 2, 2])
    assert stream.statistics().tokens == 3
    assert stream.next_event() is None
    with pytest.raises(ValueError, match=r"^TOKEN payload is not valid UTF-8 "
                                         r"\(byte 1 of the payload\)$"):
        stream.append_event(impl.EventKind.TOKEN, b"a\xff")


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "lines"}, r"^mode must be 'frames', 'text' or 'bytes', not 'lines'$"),
    ({"log_bytes": 0}, r"^log_bytes must be between 1 and 1099511627776, got 0$"),
    ({"max_frame_bytes": 0}, r"^max_frame_bytes must be between 1 and 1073741824, got 0$"),
    ({"max_frame_bytes": (1 << 30) + 1},
     r"^max_frame_bytes must be between 1 and 1073741824, got 1073741825$"),
])
def test_constructor_rejects_bad_arguments(impl, kwargs, message):
    with pytest.raises(ValueError, match=message):
        impl.TokenStream(**kwargs)


def test_statistics(impl):
    stream = impl.TokenStream(max_frame_bytes=100)
    stream.subscribe()
    stream.feed(tok("ab") + tok("cde") + jframe(0x03, {}) + frame(0x09) + b"\x01")
    stats = stream.statistics()
    assert stats == impl.StreamStatistics(
        mode="frames", bytes_fed=28, bytes_discarded=0, frames=4, tokens=2, token_bytes=5,
        events=1, errors=1, failed=False, closed=False, first_seq=1, next_seq=5,
        log_entries=4, log_bytes=(2 + 3 + 2 + len("frame at byte 22: unknown frame type 0x09; "
                                                 "its 0-byte payload is skipped") + 4 * 16),
        log_bytes_limit=8 << 20, evicted_entries=0, pending_events=2, subscribers=1,
        max_lag=4)
    stream.close()
    assert stream.statistics().bytes_discarded == 1


def test_encode_frame(impl):
    assert impl.encode_frame(impl.FrameType.INPUT, b"hi") == b"\x02\x00\x00\x00\x81hi"
    assert impl.encode_frame(impl.FrameType.INTERRUPT) == b"\x00\x00\x00\x00\x82"
    with pytest.raises(ValueError, match=r"^frame type must be a byte \(0-255\), got 256$"):
        impl.encode_frame(256, b"")


def test_enums_match_the_proto():
    impl = load_impl("python")
    for kind in impl.EventKind:
        assert stream_pb2.EventKind.Value(f"EVENT_KIND_{kind.name}") == kind.value
    assert len(stream_pb2.EventKind.values()) == len(impl.EventKind) + 1
    for code in impl.ErrorCode:
        if code:
            assert stream_pb2.ErrorCode.Value(f"ERROR_CODE_{code.name}") == code.value
    assert len(stream_pb2.ErrorCode.values()) == len(impl.ErrorCode)
