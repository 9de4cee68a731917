"""Replay windows on disk (live restore): a stream's recent output in files, so that a
restarted daemon rebuilds the replay log its clients resume from, with the same seqs.

An `OutputJournal` is one directory of segment files for one stream (a command's stdout
or stderr, a session's events), on tmpfs under the sandbox's runtime directory. Each
segment is a run of records: a 16-byte header (kind u32, length u32, seq u64,
little-endian), then `length` bytes. A FEED record is one read of the stream's input
exactly as it came, whose first entry (if it makes one) is `seq`; an EVENT record
(EVENT_BASE + the entry's kind) is an entry the runtime appended itself (append_event: a
plain agent's output copied in, a forced TURN_END); a PREFIX record opens a segment with
the input the decoder held then (a frame or code point cut by a read: `pending_input()`),
so that a segment can be decoded without the ones before it.

Rules it keeps:

1. Nothing read is lost to a SIGKILL. A read moves the bytes from the pipe into the
   segment with splice(2) (one system call: they are in the pipe or in the file, never
   only in the daemon's memory), then writes the header before them, then reads them back
   into the caller's buffer for the core. A daemon killed between the splice and the
   header leaves a zero header (a hole) before the bytes: `load` reads that torn tail as
   the last record (nobody saw it: it was never fed) and mends its header. A source that
   splice(2) refuses (EINVAL) is read with readv(2) and written with pwrite(2) instead:
   there, a SIGKILL between the two loses that one read (documented in docs/).
2. Bounded like the memory log. A new segment starts once the current one passes
   `segment_bytes` (a quarter of the bound); the oldest segment is unlinked once the
   memory log (the core bound with `bind`) has evicted every entry it made, i.e. the
   next segment starts at or before the core's first_seq. So the journal always holds
   every entry the memory log holds, plus at most a segment and a read. The memory
   window is the longest suffix of entries within log_bytes, so a core of the same
   log_bytes rebuilt from the journal evicts down to the same window, with the same seqs.
3. One write per read: the splice, a 16-byte header and the read-back; no call per token.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
from dataclasses import dataclass

from corral.ext._stream_py import ENTRY_OVERHEAD

#: kind, length, seq of the record that follows.
HEADER = struct.Struct("<IIQ")
#: A record of raw input (one read), fed to the core as it is.
FEED = 1
#: A segment's first record: the decoder's pending input when the segment began.
PREFIX = 2
#: EVENT_BASE + an entry's kind: an entry the runtime appended (append_event).
EVENT_BASE = 0x100
#: A segment file's name: the seq its first record starts at, zero-padded (sorts by seq).
SEGMENT_DIGITS = 20
#: Smallest segment, so that a small bound does not mean a file per read.
MIN_SEGMENT_BYTES = 64 << 10

assert HEADER.size == ENTRY_OVERHEAD  # a record costs what its log entry costs


class JournalError(Exception):
    """A journal could not be written or read back; the message names the file."""



def write_json(path: str, value: dict) -> None:
    """Replace path with value as JSON, whole or not at all (a temp file renamed over it):
    a record beside a journal that a SIGKILL cannot leave half written."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def load_each(base: str, load_one, problem: str) -> tuple[list, list[str]]:
    """What load_one(directory) gives for each directory under base (none when base does
    not exist), and the problems met: a directory that cannot be read back is removed and
    named as problem.format(name=..., error=...)."""
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return [], []
    found, problems = [], []
    for name in names:
        directory = os.path.join(base, name)
        try:
            found.append(load_one(directory))
        except (OSError, ValueError, TypeError, KeyError, JournalError) as exc:
            problems.append(problem.format(name=name, error=exc))
            shutil.rmtree(directory, ignore_errors=True)
    return found, problems

@dataclass
class Loaded:
    """What `OutputJournal.load` found: from first_seq on, in order, (FEED, input to feed)
    and (EVENT_BASE + kind, payload to append_event) records."""

    first_seq: int
    records: list[tuple[int, bytes]]
    #: Whether the last record was torn by a crash (its header mended by load).
    torn: bool = False

    @property
    def reads(self) -> list[bytes]:
        """The FEED records' bytes alone (a bytes-mode stream has nothing else)."""
        return [data for kind, data in self.records if kind == FEED]


class _Segment:
    def __init__(self, path: str, seq: int, size: int) -> None:
        self.path = path
        self.seq = seq
        self.size = size


class OutputJournal:
    """One stream's segments (module docstring); used by one thread (the daemon's loop)."""

    def __init__(self, path: str, bound: int, *, segment_bytes: int | None = None) -> None:
        """A journal in directory path, new or left by a previous daemon (then call load()
        before anything is appended).

        Args:
            bound: the memory log's log_bytes (the window kept).
            segment_bytes: size at which a new segment starts (default bound // 4).

        Raises:
            ValueError: bound is not positive (field "bound").
        """
        if bound < 1:
            raise ValueError(f"bound: must be at least 1 byte, got {bound}")
        self.path = path
        self.bound = bound
        self.segment_bytes = max(MIN_SEGMENT_BYTES, segment_bytes or bound // 4)
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._segments: list[_Segment] = []
        self._fd = -1
        self._total = 0
        self._splice = True
        self._stream = None
        self.removed = False

    def bind(self, stream) -> None:
        """The core this journal mirrors: its first_seq says which segments may go, its
        pending_input() opens each new segment."""
        self._stream = stream

    # -- reading back (a restarted daemon) -----------------------------------------------

    def load(self) -> Loaded | None:
        """The records the segments hold (None: nothing was written), a torn last record
        mended, and the journal ready to append after them.

        Raises:
            JournalError: a record's seq does not follow its segment's order, or an
                unknown record kind (the file is named).
        """
        names = sorted(n for n in os.listdir(self.path)
                       if len(n) == SEGMENT_DIGITS and n.isdigit())
        records: list[tuple[int, bytes]] = []
        torn = False
        for name in names:
            path = os.path.join(self.path, name)
            with open(path, "rb") as f:
                data = f.read()
            size, mended = self._records(path, data, records, first=not self._segments)
            torn = torn or mended
            self._segments.append(_Segment(path, int(name), size))
            self._total += size
        if not self._segments:
            return None
        last = self._segments[-1]
        self._fd = os.open(last.path, os.O_RDWR | os.O_CLOEXEC)
        return Loaded(self._segments[0].seq, records, torn)

    def _records(self, path: str, data: bytes, records: list[tuple[int, bytes]],
                 first: bool) -> tuple[int, bool]:
        """Append the segment's records to records (its PREFIX only for the first segment:
        otherwise those bytes came in the segment before); returns the bytes of whole
        records (what follows is cut off) and whether a torn FEED was mended."""
        off, end = 0, len(data)
        while end - off >= HEADER.size:
            kind, length, seq = HEADER.unpack_from(data, off)
            body = off + HEADER.size
            if kind == 0 and length == 0 and seq == 0:
                # spliced, header never written: the rest of the file is that read
                length = end - body
                if length:
                    with open(path, "r+b") as f:
                        f.seek(off)
                        f.write(HEADER.pack(FEED, length, 0))
                    records.append((FEED, data[body:end]))
                    return end, True
                break
            if kind == FEED:
                length = min(length, end - body)  # bytes out of the pipe are never dropped
            elif kind != PREFIX and not EVENT_BASE < kind <= EVENT_BASE + 0xFF:
                raise JournalError(f"{path}: record at byte {off} has unknown kind {kind}")
            elif body + length > end:
                break  # an appended entry cut by a crash: it was never in the log
            if kind != PREFIX:
                records.append((kind, data[body:body + length]))
            elif first and off == 0:
                records.append((FEED, data[body:body + length]))
            off = body + length
        if off != end:  # a partial header: nothing of it was fed; cut it off
            os.truncate(path, off)
        return off, False

    # -- writing (while serving) ---------------------------------------------------------

    def read_from(self, fd: int, view: memoryview, seq: int) -> int:
        """Move up to len(view) bytes from fd into a new record starting at entry seq
        and into view; 0 at EOF.

        Raises:
            BlockingIOError: fd has nothing to read now.
            OSError: reading fd failed (input is over).
            JournalError: the journal could not be written (the bytes read are in view
                when the returned count is known: see the message).
        """
        start = self._start_record(seq)
        if self._splice:
            try:
                n = os.splice(fd, self._fd, len(view), offset_dst=start + HEADER.size,
                              flags=os.SPLICE_F_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    if exc.errno == errno.ENOSPC:
                        raise JournalError(f"{self.path}: {exc.strerror}") from None
                    raise
                self._splice = False  # a pty or another source splice(2) does not serve
            else:
                if n:
                    self._finish_record(start, n, seq)
                    got = os.preadv(self._fd, [view[:n]], start + HEADER.size)
                    if got != n:
                        raise JournalError(f"{self.path}: read back {got} of {n} bytes")
                return n
        n = os.readv(fd, [view])
        if n:
            self._write(start + HEADER.size, view[:n])
            self._finish_record(start, n, seq)
        return n

    def append(self, data: bytes, seq: int) -> None:
        """A record of data (one read made elsewhere) starting at entry seq."""
        start = self._start_record(seq)
        self._write(start + HEADER.size, data)
        self._finish_record(start, len(data), seq)

    def append_event(self, kind: int, payload: bytes, seq: int) -> None:
        """A record of an entry the runtime appends (kind, payload) at seq: one write."""
        start = self._start_record(seq)
        self._write(start, HEADER.pack(EVENT_BASE + kind, len(payload), seq) + payload)
        self._grow(HEADER.size + len(payload))

    def _write(self, offset: int, data) -> None:
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise JournalError(f"{self.path}: {exc.strerror}") from None

    def _start_record(self, seq: int) -> int:
        """The offset of the next record: in a new segment when the current one is full."""
        if self.removed:
            raise JournalError(f"{self.path}: the journal was removed")
        if self._fd < 0 or self._segments[-1].size >= self.segment_bytes:
            self._new_segment(seq)
        return self._segments[-1].size

    def _finish_record(self, start: int, n: int, seq: int) -> None:
        self._write(start, HEADER.pack(FEED, n, seq))
        self._grow(HEADER.size + n)

    def _grow(self, n: int) -> None:
        self._segments[-1].size += n
        self._total += n

    def _new_segment(self, seq: int) -> None:
        path = os.path.join(self.path, f"{seq:0{SEGMENT_DIGITS}d}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"{path}: {exc.strerror}") from None
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segments.append(_Segment(path, seq, 0))
        stream = self._stream
        if stream is None:
            return
        pending = stream.pending_input()
        if pending:  # this segment decodes on its own: the cut input comes first
            self._write(0, HEADER.pack(PREFIX, len(pending), seq) + pending)
            self._grow(HEADER.size + len(pending))
        # every entry of the oldest segment was evicted from the memory log: it may go
        first = stream.first_seq
        while len(self._segments) > 1 and self._segments[1].seq <= first:
            old = self._segments.pop(0)
            self._total -= old.size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old.path)

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop writing; the files stay (for the next daemon)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete the journal's files (its stream is collected). Idempotent."""
        self.close()
        self.removed = True
        shutil.rmtree(self.path, ignore_errors=True)

    def statistics(self) -> dict:
        return {"segments": len(self._segments), "bytes": self._total,
                "first_seq": self._segments[0].seq if self._segments else 0}
