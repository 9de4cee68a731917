"""Live restore's on-disk replay window (runtime/journal.py): bounded, evicting like the
memory log, read back after a reopen with the same seqs, and a torn tail mended."""

from __future__ import annotations

import os
import random

import pytest

from corral.ext import _stream_py
from corral.ext._stream_py import EventKind, encode_frame
from corral.runtime.journal import EVENT_BASE, FEED, HEADER, OutputJournal

try:
    from corral.ext import _stream
    TWINS = [_stream_py.TokenStream, _stream.TokenStream]
except ImportError:  # the compiled core is not built: the oracle alone
    TWINS = [_stream_py.TokenStream]


def _pump(journal: OutputJournal, stream, chunks: list[bytes]) -> None:
    """Write each chunk into a pipe and read it through the journal into stream, as the
    hub does (splice, then feed what came back)."""
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    r, w = os.pipe()
    try:
        for chunk in chunks:
            os.write(w, chunk)
            n = journal.read_from(r, view, stream.next_seq)
            assert n == len(chunk)
            stream.feed(view[:n])
    finally:
        os.close(r)
        os.close(w)


def _entries(stream) -> list[tuple[int, bytes]]:
    return [(seq, stream.get(seq).payload) for seq in range(stream.first_seq, stream.next_seq)]


def _rebuilt(twin, path: str, bound: int, mode: str = "bytes"):
    journal = OutputJournal(path, bound)
    loaded = journal.load()
    stream = twin(mode, log_bytes=bound, first_seq=loaded.first_seq)
    for kind, data in loaded.records:
        if kind == FEED:
            stream.feed(data)
        else:
            stream.append_event(kind - EVENT_BASE, data)
    journal.bind(stream)
    return journal, loaded, stream


@pytest.mark.parametrize("twin", TWINS)
def test_the_journal_is_bounded_and_rebuilds_the_memory_window(tmp_path, twin):
    rng = random.Random(7)
    bound = 200_000
    chunks = [rng.randbytes(rng.randint(1, 9000)) for _ in range(400)]  # ~1.8 MB
    journal = OutputJournal(str(tmp_path / "out"), bound)
    memory = twin("bytes", log_bytes=bound)
    journal.bind(memory)
    _pump(journal, memory, chunks)
    stats = journal.statistics()
    assert stats["bytes"] <= bound + journal.segment_bytes + 2 * (9000 + HEADER.size)
    assert stats["first_seq"] <= memory.first_seq  # it holds all the memory log holds
    on_disk = sum(os.path.getsize(tmp_path / "out" / n) for n in os.listdir(tmp_path / "out"))
    assert on_disk == stats["bytes"]
    journal.close()

    _, loaded, rebuilt = _rebuilt(twin, str(tmp_path / "out"), bound)
    assert not loaded.torn
    assert (rebuilt.first_seq, rebuilt.next_seq) == (memory.first_seq, memory.next_seq)
    assert _entries(rebuilt) == _entries(memory)
    assert memory.first_seq > 1  # the test did evict


@pytest.mark.parametrize("twin", TWINS)
def test_a_reopened_journal_goes_on_with_the_next_seqs(tmp_path, twin):
    path = str(tmp_path / "out")
    bound = 70_000
    first = [bytes([i]) * (1000 + i) for i in range(60)]
    journal = OutputJournal(path, bound)
    memory = twin("bytes", log_bytes=bound)
    journal.bind(memory)
    _pump(journal, memory, first)
    journal.close()

    again, _, rebuilt = _rebuilt(twin, path, bound)
    more = [bytes([200 + i]) * 3000 for i in range(40)]
    _pump(again, rebuilt, more)
    _pump_memory = [memory.feed(c) for c in more]
    assert len(_pump_memory) == 40
    again.close()
    _, _, twice = _rebuilt(twin, path, bound)
    assert _entries(twice) == _entries(memory)
    assert twice.next_seq == 101


@pytest.mark.parametrize("twin", TWINS)
def test_a_torn_tail_is_read_as_the_last_read_and_mended(tmp_path, twin):
    path = str(tmp_path / "out")
    journal = OutputJournal(path, 1 << 20)
    memory = twin("bytes", log_bytes=1 << 20)
    _pump(journal, memory, [b"one", b"two"])
    journal.close()
    (segment,) = os.listdir(path)
    with open(os.path.join(path, segment), "ab") as f:  # spliced; the header never came
        f.write(bytes(HEADER.size) + b"three")
    _, loaded, rebuilt = _rebuilt(twin, path, 1 << 20)
    assert loaded.torn and loaded.reads == [b"one", b"two", b"three"]
    assert _entries(rebuilt) == [(1, b"one"), (2, b"two"), (3, b"three")]
    # mended: a second load reads it as a whole record, and writing goes on after it
    again, loaded, rebuilt = _rebuilt(twin, path, 1 << 20)
    assert not loaded.torn and loaded.reads == [b"one", b"two", b"three"]
    again.append(b"four", rebuilt.next_seq)
    again.close()
    with open(os.path.join(path, segment), "ab") as f:  # an event record cut mid-header
        f.write(HEADER.pack(1, 10, 5)[:7])
    _, loaded, _ = _rebuilt(twin, path, 1 << 20)
    assert loaded.reads == [b"one", b"two", b"three", b"four"]
    assert os.path.getsize(os.path.join(path, segment)) == 4 * HEADER.size + 3 + 3 + 5 + 4


def test_eof_and_an_empty_pipe(tmp_path):
    journal = OutputJournal(str(tmp_path / "out"), 1 << 20)
    view = memoryview(bytearray(4096))
    r, w = os.pipe()
    os.set_blocking(r, False)
    with pytest.raises(BlockingIOError):
        journal.read_from(r, view, 1)
    os.close(w)
    assert journal.read_from(r, view, 1) == 0
    os.close(r)
    journal.remove()
    assert not os.path.exists(tmp_path / "out")


def test_a_bound_below_one_byte_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^bound: must be at least 1 byte, got 0$"):
        OutputJournal(str(tmp_path / "out"), 0)


@pytest.mark.parametrize("twin", TWINS)
def test_a_stream_starts_at_first_seq_and_refuses_one_out_of_range(twin):
    stream = twin("bytes", log_bytes=1 << 10, first_seq=41)
    assert (stream.first_seq, stream.next_seq) == (41, 41)
    assert stream.feed(b"x") == 1 and stream.get(41).payload == b"x"
    with pytest.raises(ValueError, match=r"^first_seq must be between 1 and \d+, got 0$"):
        twin("bytes", first_seq=0)


def _entries_of(stream) -> list[tuple[int, int, bytes]]:
    return [(seq, int(e.kind), e.payload) for seq in range(stream.first_seq, stream.next_seq)
            for e in [stream.get(seq)]]


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("mode", ["frames", "text"])
def test_a_decoded_stream_cut_anywhere_rebuilds_from_any_segment(tmp_path, twin, mode):
    """Reads cut frames and code points anywhere; the runtime appends entries between them;
    segments begin mid-frame (their PREFIX): the rebuilt log is the memory log, seq for seq."""
    rng = random.Random(11)
    if mode == "frames":
        data = b"".join(encode_frame(1, f"tok{i} é ".encode()) if i % 50 else
                        encode_frame(2, b'{"status":"completed"}') for i in range(6000))
    else:
        data = "".join(f"word{i} é€ " for i in range(9000)).encode()
    bound = 40_000
    path = str(tmp_path / "out")
    journal = OutputJournal(path, bound, segment_bytes=1)  # MIN_SEGMENT_BYTES
    memory = twin(mode, log_bytes=bound)
    journal.bind(memory)
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    r, w = os.pipe()
    pos = 0
    try:
        while pos < len(data):
            cut = min(len(data), pos + rng.randint(1, 3000))
            os.write(w, data[pos:cut])
            pos = cut
            n = journal.read_from(r, view, memory.next_seq)
            memory.feed(view[:n])
            if rng.random() < 0.2:  # the runtime's own entry (a plain agent's LOG line)
                payload = b"log line"
                journal.append_event(EventKind.LOG, payload, memory.next_seq)
                memory.append_event(EventKind.LOG, payload)
    finally:
        os.close(r)
        os.close(w)
    while memory.next_event() is not None:
        pass
    assert journal.statistics()["segments"] >= 2 and memory.first_seq > 1
    journal.close()
    _, loaded, rebuilt = _rebuilt(twin, path, bound, mode)
    assert (rebuilt.first_seq, rebuilt.next_seq) == (memory.first_seq, memory.next_seq)
    assert _entries_of(rebuilt) == _entries_of(memory)
    assert rebuilt.pending_input() == memory.pending_input()


def test_an_event_record_cut_by_a_crash_is_dropped(tmp_path):
    path = str(tmp_path / "out")
    journal = OutputJournal(path, 1 << 20)
    journal.append(b"abc", 1)
    journal.append_event(EventKind.LOG, b"whole", 2)
    journal.close()
    (segment,) = os.listdir(path)
    with open(os.path.join(path, segment), "ab") as f:
        f.write(HEADER.pack(EVENT_BASE + EventKind.LOG, 100, 3) + b"cut")
    loaded = OutputJournal(path, 1 << 20).load()
    assert loaded.records == [(FEED, b"abc"), (EVENT_BASE + EventKind.LOG, b"whole")]
