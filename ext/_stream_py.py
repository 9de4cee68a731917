"""The token stream core in plain Python: the oracle for `_stream.pyx` and its fallback.

What this module owns: decoding an agent's output (protocol v1 frames, or plain text), the
per-stream replay log, subscriber cursors, and the hand-written encoding of `StreamBatch`
(proto/corral/v1/stream.proto). It also defines the public types both implementations share
(`FrameType`, `EventKind`, `ErrorCode`, `StreamEvent`, the exceptions and the statistics
records); `_stream.pyx` imports them from here so the two can never drift.

Architecture notes (the token core)
-----------------------------------
Rules this core keeps; `_stream.pyx` keeps exactly the same ones, and the differential test
(tests/unit/test_stream_fuzz.py) holds the two to identical events, batches and statistics.

1. Sans-IO. Bytes go in through `feed()`, encoded batches come out of `take()`. No sockets,
   no asyncio, no gRPC; `runtime/streams.py` owns the file descriptors and the waking.
2. One sequence space per stream. Every log entry (token, other event, error) gets the next
   seq, starting at 1; seqs never repeat and never skip.
3. The log is the truth. A token exists only as bytes in the log's arena: the fast path is
   `feed()` then `take()`, and no token ever becomes a Python object in the compiled core.
   Non-token entries (TURN_END, PROGRESS, ..., errors) are also queued as `StreamEvent`
   tuples for the runtime, pulled with `next_event()`; they are rare, so that costs nothing.
4. Malformed input is an ERROR entry, never an exception. Resync rule: an oversize length
   is fatal for the stream (framing is lost, later bytes are counted and dropped); an unknown
   frame type or a bad payload skips exactly that frame. Exceptions are for caller bugs only
   (feeding a closed stream, a cursor from another stream, an out-of-range seq).
5. The log is bounded by bytes. Each entry costs its stored bytes plus `ENTRY_OVERHEAD`; the
   oldest entries are evicted once the total passes `log_bytes`, but the newest entry always
   stays, so a single huge entry still reaches its subscribers.
6. Subscribers never hold anything back. A cursor is only a seq; the producer does not look at
   cursors. A subscriber whose cursor fell behind the oldest entry learns it in its next
   batch (`StreamBatch.lost`), which then starts at the oldest entry still held.
7. A batch is built in two passes: the first decides how many entries fit in `max_bytes`
   (reserving `BATCH_OVERHEAD` for the fixed fields), the second writes protobuf wire format
   directly: canonical, i.e. byte-identical to what the generated classes would serialize.
8. Bytes mode (a command's stdout and stderr through `Sandboxes.Exec`) stores every read as
   one TOKEN entry exactly as it came, with no decoding: binary output stays byte-exact.
   Such a "token" is raw bytes, not text; `append_event(TOKEN, ...)` still wants UTF-8.
9. Plain text mode decodes UTF-8 incrementally: a chunk never ends inside a code point, and
   invalid bytes become U+FFFD following Unicode's "maximal subpart" practice (the same
   text as Python's `bytes.decode("utf-8", "replace")` of the whole stream). A read's complete
   part is one chunk; only a valid-but-cut sequence at its end waits for the next read.

Memory layout: token text and event payloads sit back to back in one byte arena; per entry the
log keeps only the absolute end offset of its bytes, its kind and its error code. Eviction
moves a head index; the dead prefix is cut off once it is larger than the live part, so
eviction is amortised O(1) per byte and the text of consecutive tokens stays contiguous.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import operator
import struct
from collections import deque
from typing import NamedTuple

from corral.ext import STREAM_API

__all__ = sorted(STREAM_API)  # one list of names for both implementations

IMPLEMENTATION = "python"

HEADER_SIZE = 5  # u32 little-endian payload length + u8 frame type
DEFAULT_MAX_FRAME_BYTES = 1 << 20  # payload bytes of one frame
MAX_FRAME_BYTES_LIMIT = 1 << 30  # the largest max_frame_bytes a stream accepts
DEFAULT_LOG_BYTES = 8 << 20  # replay log budget per stream
MAX_LOG_BYTES_LIMIT = 1 << 40
MAX_FIRST_SEQ = 1 << 62  # the largest first_seq a stream accepts
ENTRY_OVERHEAD = 16  # bytes each log entry costs on top of its stored bytes
BATCH_OVERHEAD = 64  # bytes take() reserves for a batch's fixed fields (they need at most 58)
DEFAULT_TAKE_BYTES = 64 << 10
MODES = ("frames", "text", "bytes")


class FrameType(enum.IntEnum):
    """The type byte of a protocol v1 frame (docs/agent-protocol.md)."""

    # agent -> runtime, on CORRAL_EVENTS_FD
    TOKEN = 0x01
    TURN_END = 0x02
    PROGRESS = 0x03
    CHECKPOINT = 0x04
    RESULT = 0x05
    LOG = 0x06
    TOOL_CALL = 0x07
    # runtime -> agent, on CORRAL_CONTROL_FD
    INPUT = 0x81
    INTERRUPT = 0x82
    SHUTDOWN = 0x83


class EventKind(enum.IntEnum):
    """What a log entry is; equals corral.v1.EventKind (1-7 are the frame type bytes)."""

    TOKEN = 1
    TURN_END = 2
    PROGRESS = 3
    CHECKPOINT = 4
    RESULT = 5
    LOG = 6
    TOOL_CALL = 7
    ERROR = 64


class ErrorCode(enum.IntEnum):
    """Why input was rejected; equals corral.v1.ErrorCode."""

    NONE = 0
    FRAME_TOO_LARGE = 1
    UNKNOWN_FRAME_TYPE = 2
    BAD_UTF8 = 3
    BAD_JSON = 4
    TRUNCATED_FRAME = 5


class StreamEvent(NamedTuple):
    """One log entry. Mirrors corral.v1.StreamEvent; tokens appear here only through `get()`."""

    seq: int
    kind: EventKind
    payload: bytes  # as the agent sent it (a token's UTF-8 text); b"" for ERROR
    error: ErrorCode = ErrorCode.NONE  # set only for ERROR
    message: str = ""  # set only for ERROR: what was wrong, and where


class SeqEvictedError(LookupError):
    """The asked-for seq was evicted from the replay log."""

    def __init__(self, seq: int, first_available: int) -> None:
        super().__init__(
            f"seq {seq} was evicted from the replay log; "
            f"the oldest seq still held is {first_available}"
        )
        self.seq = seq
        self.first_available = first_available


class StreamClosedError(RuntimeError):
    """Input was fed to a stream after close()."""


@dataclasses.dataclass(frozen=True)
class StreamStatistics:
    """A snapshot of one stream's counters (trio's `statistics()` convention)."""

    mode: str  # "frames", "text" or "bytes"
    bytes_fed: int  # every byte given to feed()
    bytes_discarded: int  # bytes dropped: after a fatal error, or a partial frame at close()
    frames: int  # complete frames decoded, good or bad
    tokens: int  # TOKEN entries appended (frames mode) or text chunks (text mode), ever
    token_bytes: int  # UTF-8 bytes of those tokens
    events: int  # non-token, non-error entries appended, ever (append_event() included)
    errors: int  # ERROR entries appended, ever
    failed: bool  # framing was lost (FRAME_TOO_LARGE); later input is ignored
    closed: bool  # close() was called
    first_seq: int  # oldest seq still in the log (== next_seq when the log is empty)
    next_seq: int  # the seq the next entry will get
    log_entries: int  # entries held now
    log_bytes: int  # budget in use now: stored bytes + ENTRY_OVERHEAD per entry
    log_bytes_limit: int  # the budget (bytes)
    evicted_entries: int  # entries evicted, ever
    pending_events: int  # events queued for next_event()
    subscribers: int  # cursors not unsubscribed
    max_lag: int  # entries the furthest-behind subscriber has not taken (lost ones included)
    lagged_subscribers: int = 0  # subscribers whose next entry was evicted: they lost entries


@dataclasses.dataclass(frozen=True)
class CursorStatistics:
    """A snapshot of one subscriber cursor's counters."""

    next_seq: int  # the seq its next batch starts at, unless it fell behind
    batches: int  # batches taken
    entries: int  # entries taken
    bytes: int  # encoded batch bytes taken
    lost_entries: int  # entries evicted before this subscriber took them


_TOKEN = int(EventKind.TOKEN)  # plain ints on the hot paths: enum attribute lookups are slow
_ERROR = int(EventKind.ERROR)
_ONE_BYTE = [bytes((n,)) for n in range(0x80)]  # varints of 0..127
_JSON_KINDS = frozenset((FrameType.TURN_END, FrameType.PROGRESS, FrameType.RESULT,
                         FrameType.TOOL_CALL))
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number",
                    float: "number", bool: "boolean", type(None): "null"}
_HEADER = struct.Struct("<IB")


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """One protocol v1 frame: u32 LE payload length, u8 type, payload.

    Raises:
        ValueError: the type is not a byte, or the payload is 4 GiB or more.
    """
    if not 0 <= frame_type <= 0xFF:
        raise ValueError(f"frame type must be a byte (0-255), got {frame_type}")
    if len(payload) > 0xFFFFFFFF:
        raise ValueError(f"frame payload of {len(payload)} bytes does not fit a u32 length")
    return _HEADER.pack(len(payload), frame_type) + bytes(payload)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_len(value: int) -> int:
    n = 1
    while value > 0x7F:
        value >>= 7
        n += 1
    return n


def _incomplete_tail_start(data: bytes) -> int:
    """Where a code point cut by the end of `data` starts, or len(data) when none is.

    Only a valid prefix counts (a lead byte C2-F4, the second byte within its lead's range,
    fewer bytes than the lead needs); anything else is already decidable as invalid. Python's
    incremental decoder is not used because it holds some already-invalid prefixes (ED A0).
    """
    n = len(data)
    for back in range(1, min(3, n) + 1):
        lead = data[n - back]
        if lead < 0x80:
            return n
        if lead < 0xC0:
            continue  # a continuation byte: look further back for its lead
        if not 0xC2 <= lead <= 0xF4:
            return n
        need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if back >= need:
            return n
        if back >= 2:
            lo, hi = _SECOND_BYTE_RANGE.get(lead, (0x80, 0xBF))
            if not lo <= data[n - back + 1] <= hi:
                return n
        return n - back
    return n


# The second byte's range where it is not 80-BF: no overlong forms, no surrogates, nothing
# above U+10FFFF (Unicode table 3-7).
_SECOND_BYTE_RANGE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF),
                      0xF4: (0x80, 0x8F)}


def _frame_name(frame_type: int) -> str:
    return FrameType(frame_type).name


def _payload_problem(frame_type: int, payload: bytes) -> tuple[ErrorCode, str] | None:
    """Why a known frame's payload is invalid, or None when it is fine."""
    if frame_type == FrameType.CHECKPOINT:
        return None
    name = _frame_name(frame_type)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ErrorCode.BAD_UTF8, (
            f"{name} payload is not valid UTF-8 (byte {exc.start} of the payload)"
        )
    if frame_type not in _JSON_KINDS:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return ErrorCode.BAD_JSON, (
            f"{name} payload is not valid JSON ({exc.msg} at character {exc.pos})"
        )
    except RecursionError:
        return ErrorCode.BAD_JSON, f"{name} payload is not valid JSON (nested too deeply)"
    if not isinstance(value, dict):
        return ErrorCode.BAD_JSON, (
            f"{name} payload is not a JSON object (it is a JSON "
            f"{_JSON_TYPE_NAMES[type(value)]})"
        )
    if frame_type == FrameType.TURN_END and not isinstance(value.get("status"), str):
        return ErrorCode.BAD_JSON, 'TURN_END payload has no string "status"'
    return None


# --- rules and records both implementations use (ext/_stream.pyx calls these too) ------


def check_stream_args(mode: str, log_bytes: int, max_frame_bytes: int, first_seq: int) -> None:
    """TokenStream's constructor arguments, checked.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'frames', 'text' or 'bytes', not {mode!r}")
    if not 1 <= log_bytes <= MAX_LOG_BYTES_LIMIT:
        raise ValueError(
            f"log_bytes must be between 1 and {MAX_LOG_BYTES_LIMIT}, got {log_bytes}")
    if not 1 <= max_frame_bytes <= MAX_FRAME_BYTES_LIMIT:
        raise ValueError(f"max_frame_bytes must be between 1 and {MAX_FRAME_BYTES_LIMIT}, "
                         f"got {max_frame_bytes}")
    if not 1 <= first_seq <= MAX_FIRST_SEQ:
        raise ValueError(f"first_seq must be between 1 and {MAX_FIRST_SEQ}, got {first_seq}")


def check_appended_kind(kind: int) -> None:
    """append_event()'s kind: the runtime may append TOKEN..TOOL_CALL, never an ERROR.

    Raises:
        ValueError: kind is out of that range.
    """
    if not EventKind.TOKEN <= kind <= EventKind.TOOL_CALL:
        raise ValueError(
            f"append_event() takes an event kind from 1 (TOKEN) to 7 (TOOL_CALL), "
            f"got {int(kind)}")


def check_held_seq(seq: int, first_seq: int, next_seq: int) -> None:
    """get()'s seq: written, and still in the log that holds first_seq..next_seq - 1.

    Raises:
        SeqEvictedError: the entry was evicted.
        ValueError: seq is below 1 or not written yet.
    """
    if seq < 1:
        raise ValueError(f"seq must be at least 1, got {seq}")
    if seq >= next_seq:
        raise ValueError(f"seq {seq} is not written yet; the next seq is {next_seq}")
    if seq < first_seq:
        raise SeqEvictedError(seq, first_seq)


def subscription_start(from_seq: int | None, first_seq: int, next_seq: int) -> int:
    """The seq a new cursor starts at: from_seq, or first_seq when it is None.

    Raises:
        ValueError: from_seq is below 1 or beyond next_seq.
    """
    if from_seq is None:
        return first_seq
    if from_seq < 1:
        raise ValueError(f"from_seq must be at least 1, got {from_seq}")
    if from_seq > next_seq:
        raise ValueError(
            f"from_seq {from_seq} is ahead of the stream; the next seq is {next_seq}")
    return from_seq


def _read_only(attribute: str, doc: str) -> property:
    """A read-only public view of a private attribute (the compiled twin's readonly ones)."""
    return property(operator.attrgetter(attribute), doc=doc)


def stream_statistics(stream: TokenStream, mode: str, max_lag: int,
                      lagged: int) -> StreamStatistics:
    """statistics() of either implementation's TokenStream, which both keep their counters
    under these attribute names (the compiled one as read-only attributes)."""
    return StreamStatistics(
        mode=mode,
        bytes_fed=stream._bytes_fed,
        bytes_discarded=stream._bytes_discarded,
        frames=stream._frames,
        tokens=stream._tokens,
        token_bytes=stream._token_bytes,
        events=stream._n_events,
        errors=stream._errors,
        failed=stream.failed,
        closed=stream.closed,
        first_seq=stream.first_seq,
        next_seq=stream.next_seq,
        log_entries=stream.next_seq - stream.first_seq,
        log_bytes=stream._log_bytes,
        log_bytes_limit=stream._log_limit,
        evicted_entries=stream._evicted,
        pending_events=len(stream._events),
        subscribers=len(stream._cursors),
        max_lag=max_lag,
        lagged_subscribers=lagged,
    )


class Cursor:
    """A subscriber's position in one stream; pass it to `TokenStream.take()`."""

    __slots__ = ("_stream", "_subscribed", "_next_seq", "_batches", "_entries", "_bytes",
                 "_lost")

    def __init__(self, stream: TokenStream, next_seq: int) -> None:
        self._stream = stream
        self._subscribed = True
        self._next_seq = next_seq
        self._batches = 0
        self._entries = 0
        self._bytes = 0
        self._lost = 0

    @property
    def next_seq(self) -> int:
        """The seq this cursor's next batch starts at, unless it fell behind."""
        return self._next_seq

    def statistics(self) -> CursorStatistics:
        return CursorStatistics(self._next_seq, self._batches, self._entries, self._bytes,
                                self._lost)

    def __repr__(self) -> str:
        return f"<Cursor next_seq={self.next_seq}>"


class TokenStream:
    """One agent output stream: decoder, bounded replay log and subscriber cursors.

    Args:
        mode: "frames" for the protocol v1 events fd, "text" for a plain agent's output
            (UTF-8, invalid bytes replaced), "bytes" for output kept byte-exact (one entry
            per feed, no decoding).
        log_bytes: replay log budget in bytes (stored bytes + ENTRY_OVERHEAD per entry).
        max_frame_bytes: the largest frame payload accepted, in bytes.
        first_seq: the seq of the first entry (1; more for a log rebuilt from a journal
            whose older entries were evicted: live restore, runtime/journal.py).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(self, mode: str = "frames", *, log_bytes: int = DEFAULT_LOG_BYTES,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, first_seq: int = 1) -> None:
        check_stream_args(mode, log_bytes, max_frame_bytes, first_seq)
        self._mode = mode
        self._text_mode = mode == "text"
        self._bytes_mode = mode == "bytes"
        self._log_limit = log_bytes
        self._max_frame = max_frame_bytes
        # log: entry i (i >= _ehead) has seq _first_seq + i - _ehead and stored bytes
        # arena[start - _arena_base : _ends[i] - _arena_base], start being the previous end.
        self._arena = bytearray()
        self._arena_base = 0  # absolute offset of arena[0]
        self._start_abs = 0  # absolute offset where the oldest entry's bytes start
        self._ends: list[int] = []
        self._kinds: list[int] = []
        self._codes: list[int] = []
        self._ehead = 0
        self._first_seq = first_seq
        self._next_seq = first_seq
        self._log_bytes = 0
        # decoder
        self._buf = bytearray()  # bytes of a frame not complete yet
        self._buf_offset = 0  # stream offset of _buf[0]
        self._tail = b""  # text mode: a code point cut by the end of the last read
        self._failed = False
        self._closed = False
        self._events: deque[StreamEvent] = deque()
        self._cursors: set[Cursor] = set()
        # counters
        self._bytes_fed = 0
        self._bytes_discarded = 0
        self._frames = 0
        self._tokens = 0
        self._token_bytes = 0
        self._n_events = 0
        self._errors = 0
        self._evicted = 0

    # --- input -------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Decode more of the stream; returns how many log entries it appended.

        Raises:
            StreamClosedError: close() was called before.
        """
        if self._closed:
            raise StreamClosedError("feed() after close(): the stream has ended")
        data = bytes(data)
        self._bytes_fed += len(data)
        if self._failed:
            self._bytes_discarded += len(data)
            return 0
        before = self._next_seq
        if self._bytes_mode:
            if data:
                self._append_token(data)
            return self._next_seq - before
        if self._text_mode:
            data = self._tail + data
            cut = _incomplete_tail_start(data)
            self._tail = data[cut:]
            if cut:
                self._append_token(data[:cut].decode("utf-8", "replace").encode("utf-8"))
            return self._next_seq - before
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        max_frame = self._max_frame
        while end - pos >= HEADER_SIZE:
            length, frame_type = _HEADER.unpack_from(buf, pos)
            if length > max_frame:
                self._fail(self._buf_offset + pos, length, end - pos)
                return self._next_seq - before
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            payload = bytes(buf[pos + HEADER_SIZE:stop])
            self._frames += 1
            if frame_type == _TOKEN:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    self._on_frame(frame_type, payload, self._buf_offset + pos)
                else:
                    self._append_token(payload)
            else:
                self._on_frame(frame_type, payload, self._buf_offset + pos)
            pos = stop
        del buf[:pos]
        self._buf_offset += pos
        return self._next_seq - before

    def close(self) -> int:
        """End of input: flush a partial code point, or report a partial frame.

        Returns how many log entries it appended; a second call does nothing.
        """
        if self._closed:
            return 0
        self._closed = True
        before = self._next_seq
        if self._text_mode:
            if self._tail:  # a valid but cut sequence is one maximal subpart: one U+FFFD
                self._append_token(self._tail.decode("utf-8", "replace").encode("utf-8"))
                self._tail = b""
        elif not self._failed and self._buf:
            have = len(self._buf)
            if have < HEADER_SIZE:
                message = (f"stream ended inside the frame header at byte {self._buf_offset}: "
                           f"{have} of {HEADER_SIZE} bytes received")
            else:
                length, frame_type = _HEADER.unpack_from(self._buf, 0)
                message = (f"stream ended inside the frame at byte {self._buf_offset} "
                           f"(type 0x{frame_type:02x}, length {length}): "
                           f"{have} of {HEADER_SIZE + length} bytes received")
            self._bytes_discarded += have
            self._buf_offset += have
            self._buf.clear()
            self._append_error(ErrorCode.TRUNCATED_FRAME, message)
        return self._next_seq - before

    def append_event(self, kind: int, payload: bytes = b"") -> int:
        """Append a runtime-made entry (e.g. a TURN_END after a forced stop); returns its seq.

        TOKEN is accepted too, for text the runtime merges into the stream itself (a plain
        agent's stdout in a session); its payload must be valid UTF-8. The entry is not
        queued for next_event(): its caller already knows it.

        Raises:
            ValueError: kind is not TOKEN..TOOL_CALL, or the payload breaks its kind's rules.
        """
        check_appended_kind(kind)
        payload = bytes(payload)
        if kind == EventKind.TOKEN:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"TOKEN payload is not valid UTF-8 (byte {exc.start} of the payload)"
                ) from None
            self._tokens += 1
            self._token_bytes += len(payload)
            return self._append(payload, _TOKEN, 0)
        problem = _payload_problem(kind, payload)
        if problem is not None:
            raise ValueError(problem[1])
        self._n_events += 1
        return self._append(payload, kind, ErrorCode.NONE)

    def pending_input(self) -> bytes:
        """The bytes fed that are not part of an entry yet: a frame cut by the end of the
        last read (frames mode) or a cut UTF-8 sequence (text mode); b"" in bytes mode and
        once framing is lost. Live restore's journal starts a segment with them."""
        if self._failed:
            return b""
        if self._text_mode:
            return bytes(self._tail)
        return bytes(self._buf)

    def next_event(self) -> StreamEvent | None:
        """The oldest non-token entry not pulled yet (errors included), or None."""
        if self._events:
            return self._events.popleft()
        return None

    def _fail(self, offset: int, length: int, remaining: int) -> None:
        self._failed = True
        self._bytes_discarded += remaining
        self._buf_offset += remaining
        self._buf.clear()
        self._append_error(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame at byte {offset}: length {length} exceeds the {self._max_frame}-byte "
            f"frame limit; framing is lost, the rest of the stream is ignored")

    def _on_frame(self, frame_type: int, payload: bytes, offset: int) -> None:
        if not FrameType.TOKEN <= frame_type <= FrameType.TOOL_CALL:
            self._append_error(
                ErrorCode.UNKNOWN_FRAME_TYPE,
                f"frame at byte {offset}: unknown frame type 0x{frame_type:02x}; "
                f"its {len(payload)}-byte payload is skipped")
            return
        problem = _payload_problem(frame_type, payload)
        if problem is not None:
            self._append_error(problem[0],
                               f"frame at byte {offset}: {problem[1]}; frame skipped")
            return
        self._n_events += 1
        seq = self._append(payload, frame_type, ErrorCode.NONE)
        self._events.append(StreamEvent(seq, EventKind(frame_type), payload))

    def _append_error(self, code: ErrorCode, message: str) -> None:
        self._errors += 1
        seq = self._append(message.encode("utf-8"), EventKind.ERROR, code)
        self._events.append(StreamEvent(seq, EventKind.ERROR, b"", code, message))

    def _append_token(self, text: bytes) -> None:
        self._tokens += 1
        self._token_bytes += len(text)
        self._append(text, _TOKEN, 0)

    def _append(self, stored: bytes, kind: int, code: int) -> int:
        arena = self._arena
        arena += stored
        self._ends.append(self._arena_base + len(arena))
        self._kinds.append(kind)
        self._codes.append(code)
        seq = self._next_seq
        self._next_seq = seq + 1
        self._log_bytes += len(stored) + ENTRY_OVERHEAD
        if self._log_bytes > self._log_limit:
            self._evict()
        return seq

    def _evict(self) -> None:
        ends = self._ends
        head = self._ehead
        last = len(ends) - 1
        start = self._start_abs
        while self._log_bytes > self._log_limit and head < last:
            end = ends[head]
            self._log_bytes -= end - start + ENTRY_OVERHEAD
            start = end
            head += 1
        self._evicted += head - self._ehead
        self._first_seq += head - self._ehead
        self._start_abs = start
        self._ehead = head
        # Cut the dead prefixes once they outgrow the live part (amortised O(1)).
        if head > 64 and head * 2 > len(ends):
            del ends[:head], self._kinds[:head], self._codes[:head]
            self._ehead = 0
        dead = start - self._arena_base
        if dead > 4096 and dead * 2 > len(self._arena):
            del self._arena[:dead]
            self._arena_base = start

    # --- log ---------------------------------------------------------------------------

    # read-only views (attributes of the compiled twin, see _stream.pxd)
    first_seq = _read_only("_first_seq", "The oldest seq still in the log (next_seq when the "
                                         "log is empty).")
    next_seq = _read_only("_next_seq", "The seq the next entry will get.")
    failed = _read_only("_failed", "Framing was lost; input after that point is ignored.")
    closed = _read_only("_closed", "close() was called: the input has ended.")

    def get(self, seq: int) -> StreamEvent:
        """The log entry with this seq, tokens included (slow path: tests, debugging).

        Raises:
            SeqEvictedError: the entry was evicted.
            ValueError: seq is below 1 or not written yet.
        """
        check_held_seq(seq, self._first_seq, self._next_seq)
        i = self._ehead + seq - self._first_seq
        start = self._ends[i - 1] if i > self._ehead else self._start_abs
        stored = bytes(self._arena[start - self._arena_base:self._ends[i] - self._arena_base])
        kind = EventKind(self._kinds[i])
        if kind == EventKind.ERROR:
            return StreamEvent(seq, kind, b"", ErrorCode(self._codes[i]), stored.decode())
        return StreamEvent(seq, kind, stored)

    # --- subscribers -------------------------------------------------------------------

    def subscribe(self, from_seq: int | None = None) -> Cursor:
        """A new cursor starting at from_seq (default: the oldest entry still held).

        A from_seq that was already evicted is accepted: the first batch reports the loss.

        Raises:
            ValueError: from_seq is below 1 or beyond next_seq.
        """
        cursor = Cursor(self, subscription_start(from_seq, self._first_seq, self._next_seq))
        self._cursors.add(cursor)
        return cursor

    def unsubscribe(self, cursor: Cursor) -> None:
        """Forget a cursor; taking with it afterwards is an error. Idempotent."""
        self._check_cursor(cursor, allow_unsubscribed=True)
        cursor._subscribed = False
        self._cursors.discard(cursor)

    def _check_cursor(self, cursor: Cursor, allow_unsubscribed: bool = False) -> None:
        if not isinstance(cursor, Cursor):
            raise TypeError(f"expected a Cursor from subscribe(), got {type(cursor).__name__}")
        if cursor._stream is not self:
            raise ValueError("cursor belongs to another stream")
        if not cursor._subscribed and not allow_unsubscribed:
            raise ValueError("cursor was unsubscribed")

    def take(self, cursor: Cursor, max_bytes: int = DEFAULT_TAKE_BYTES) -> bytes | None:
        """The next encoded `corral.v1.StreamBatch` for this cursor, or None when caught up.

        The batch is at most max_bytes long unless its first entry alone is larger (then it
        holds just that entry), and it advances the cursor past what it holds.

        Raises:
            ValueError: max_bytes is below 1, or the cursor is not this stream's.
        """
        self._check_cursor(cursor)
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        start = cursor._next_seq
        next_seq = self._next_seq
        lost = 0
        if start < self._first_seq:
            lost = self._first_seq - start
            start = self._first_seq
        if start >= next_seq:
            return None
        ends, kinds, codes, arena = self._ends, self._kinds, self._codes, self._arena
        base = self._arena_base
        i = self._ehead + start - self._first_seq
        pos = ends[i - 1] if i > self._ehead else self._start_abs
        # pass 1: how many entries fit
        used = BATCH_OVERHEAD
        last = self._ehead + next_seq - self._first_seq
        j = i
        prev = pos
        while j < last:
            end = ends[j]
            size = end - prev
            if kinds[j] == _TOKEN:
                cost = size + (1 if size < 0x80 else _varint_len(size))
            else:
                event_size = self._event_size(start + j - i, kinds[j], codes[j], size)
                cost = 1 + _varint_len(event_size) + event_size
            if j > i and used + cost > max_bytes:
                break
            used += cost
            prev = end
            j += 1
        # pass 2: write the wire format
        text = bytearray()
        lengths = bytearray()
        events = bytearray()
        prev = pos
        for k in range(i, j):
            end = ends[k]
            stored = arena[prev - base:end - base]
            if kinds[k] == _TOKEN:
                text += stored
                size = end - prev
                lengths += _ONE_BYTE[size] if size < 0x80 else _varint(size)
            else:
                events += self._encode_event(start + k - i, kinds[k], codes[k], stored)
            prev = end
        out = bytearray(b"\x08" + _varint(start))
        if text:
            out += b"\x12" + _varint(len(text)) + text
        if lengths:
            out += b"\x1a" + _varint(len(lengths)) + lengths
        out += events
        if lost:
            notice = b"\x08" + _varint(cursor._next_seq) + b"\x10" + _varint(lost)
            out += b"\x2a" + _varint(len(notice)) + notice
        out += b"\x30" + _varint(next_seq)
        cursor._next_seq = start + j - i
        cursor._batches += 1
        cursor._entries += j - i
        cursor._bytes += len(out)
        cursor._lost += lost
        return bytes(out)

    @classmethod
    def _encode_event(cls, seq: int, kind: int, code: int, stored: bytes) -> bytes:
        """One StreamEvent as StreamBatch field 4 (tag, length, then the event)."""
        out = bytearray(b"\x22" + _varint(cls._event_size(seq, kind, code, len(stored))))
        out += b"\x08" + _varint(seq) + b"\x10" + _varint(kind)
        if kind == _ERROR:
            out += b"\x20" + _varint(code)
            if stored:
                out += b"\x2a" + _varint(len(stored)) + stored
        elif stored:
            out += b"\x1a" + _varint(len(stored)) + stored
        return out

    @staticmethod
    def _event_size(seq: int, kind: int, code: int, size: int) -> int:
        """Encoded size of one StreamEvent (without its own tag and length)."""
        n = 1 + _varint_len(seq) + 1 + _varint_len(kind)
        if code:
            n += 1 + _varint_len(code)
        if size:
            n += 1 + _varint_len(size) + size
        return n

    # --- introspection -----------------------------------------------------------------

    def statistics(self) -> StreamStatistics:
        behind = [c._next_seq for c in self._cursors]
        lag = self._next_seq - min(behind, default=self._next_seq)
        lagged = sum(1 for seq in behind if seq < self._first_seq)
        return stream_statistics(self, self._mode, lag, lagged)

    def __repr__(self) -> str:
        return (f"<TokenStream {self._mode} seq {self._first_seq}..{self._next_seq - 1} "
                f"log {self._log_bytes}/{self._log_limit} B>")
