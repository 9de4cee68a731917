# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The token stream core, compiled: decoder, replay log, cursors and StreamBatch encoder.

Same API and same rules as the pure-Python twin `corral.ext._stream_py`, whose docstring holds
the architecture notes; the public types (enums, StreamEvent, exceptions, statistics records)
are imported from there so the two implementations cannot drift. What this file adds is speed:
tokens stay bytes in a C arena from feed() to take(), UTF-8 is checked in C, and take() writes
protobuf wire format straight into the bytes object it returns.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

import json
from collections import deque

from corral.ext._stream_py import (
    BATCH_OVERHEAD,
    DEFAULT_LOG_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_TAKE_BYTES,
    ENTRY_OVERHEAD,
    HEADER_SIZE,
    MAX_FIRST_SEQ,
    MAX_FRAME_BYTES_LIMIT,
    MAX_LOG_BYTES_LIMIT,
    MODES,
    CursorStatistics,
    ErrorCode,
    EventKind,
    FrameType,
    SeqEvictedError,
    StreamClosedError,
    StreamEvent,
    StreamStatistics,
    check_appended_kind,
    check_held_seq,
    check_stream_args,
    stream_statistics,
    subscription_start,
)

IMPLEMENTATION = "cython"

cdef enum:
    K_TOKEN = 1
    K_TURN_END = 2
    K_PROGRESS = 3
    K_CHECKPOINT = 4
    K_RESULT = 5
    K_LOG = 6
    K_TOOL_CALL = 7
    K_ERROR = 64

cdef enum:
    E_FRAME_TOO_LARGE = 1
    E_UNKNOWN_FRAME_TYPE = 2
    E_BAD_UTF8 = 3
    E_BAD_JSON = 4
    E_TRUNCATED_FRAME = 5

cdef enum:
    HEADER = 5
    OVERHEAD = 16
    BATCH_OVH = 64

cdef enum:
    U_VALID = 0
    U_INVALID = 1
    U_TRUNCATED = 2

assert HEADER == HEADER_SIZE and OVERHEAD == ENTRY_OVERHEAD and BATCH_OVH == BATCH_OVERHEAD

cdef dict _FRAME_NAMES = {int(t): t.name for t in FrameType}
cdef dict _JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number",
                              float: "number", bool: "boolean", type(None): "null"}
cdef object _JSONDecodeError = json.JSONDecodeError
cdef object _json_loads = json.loads


# --- wire helpers ------------------------------------------------------------------------

cdef inline uint32_t _u32le(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline size_t _vlen(uint64_t v) noexcept nogil:
    cdef size_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline unsigned char* _put_varint(unsigned char* w, uint64_t v) noexcept nogil:
    while v >= 0x80:
        w[0] = <unsigned char>((v & 0x7F) | 0x80)
        w += 1
        v >>= 7
    w[0] = <unsigned char>v
    return w + 1


cdef inline size_t _event_size(uint64_t seq, uint8_t kind, uint8_t code,
                               uint64_t size) noexcept nogil:
    """Encoded size of one StreamEvent, without its own tag and length."""
    cdef size_t n = 1 + _vlen(seq) + 1 + _vlen(kind)
    if code:
        n += 1 + _vlen(code)
    if size:
        n += 1 + _vlen(size) + size
    return n


# --- UTF-8 ---------------------------------------------------------------------------------

cdef inline int _utf8_unit(const unsigned char* s, Py_ssize_t n,
                           Py_ssize_t* length) noexcept nogil:
    """Classify the sequence starting at s[0] (n >= 1 bytes available).

    U_VALID: a whole code point of `length` bytes. U_INVALID: `length` is the maximal subpart
    (Unicode's term: the longest prefix that could have started a valid sequence) to replace.
    U_TRUNCATED: every byte up to the end is a valid prefix; `length` bytes are available.
    """
    cdef unsigned char c = s[0]
    cdef unsigned char lo = 0x80
    cdef unsigned char hi = 0xBF
    cdef Py_ssize_t need, k
    if c < 0x80:
        length[0] = 1
        return U_VALID
    if c < 0xC2 or c > 0xF4:
        length[0] = 1
        return U_INVALID
    if c < 0xE0:
        need = 2
    elif c < 0xF0:
        need = 3
        if c == 0xE0:
            lo = 0xA0  # no overlong forms
        elif c == 0xED:
            hi = 0x9F  # no surrogates
    else:
        need = 4
        if c == 0xF0:
            lo = 0x90  # no overlong forms
        elif c == 0xF4:
            hi = 0x8F  # nothing above U+10FFFF
    if n < 2:
        length[0] = 1
        return U_TRUNCATED
    if s[1] < lo or s[1] > hi:
        length[0] = 1
        return U_INVALID
    k = 2
    while k < need:
        if k >= n:
            length[0] = k
            return U_TRUNCATED
        if (s[k] & 0xC0) != 0x80:
            length[0] = k
            return U_INVALID
        k += 1
    length[0] = need
    return U_VALID


cdef inline Py_ssize_t _skip_ascii(const unsigned char* s, Py_ssize_t i,
                                   Py_ssize_t n) noexcept nogil:
    """Index of the first non-ASCII byte of s[i:n] (or n), eight bytes at a time."""
    cdef uint64_t word
    while i + 8 <= n:
        memcpy(&word, s + i, 8)
        if word & 0x8080808080808080ULL:
            break
        i += 8
    while i < n and s[i] < 0x80:
        i += 1
    return i


cdef inline Py_ssize_t _utf8_error_at(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Index of the first ill-formed sequence in s[:n], or -1 when all of it is UTF-8."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t ln
    while i < n:
        if s[i] < 0x80:
            i = _skip_ascii(s, i, n)
            continue
        if _utf8_unit(s + i, n - i, &ln) != U_VALID:
            return i
        i += ln
    return -1


cdef inline unsigned char* _put_replacement(unsigned char* w) noexcept nogil:
    w[0] = 0xEF
    w[1] = 0xBF
    w[2] = 0xBD
    return w + 3


cdef Py_ssize_t _utf8_replace(const unsigned char* s, Py_ssize_t n, unsigned char* out,
                              Py_ssize_t* consumed) noexcept nogil:
    """Copy s[:n] to out with each maximal ill-formed subpart replaced by U+FFFD.

    Stops before a truncated sequence at the very end (`consumed` says where); returns the
    bytes written. `out` must have room for 3 * n bytes.
    """
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t run = 0
    cdef Py_ssize_t ln
    cdef unsigned char* w = out
    cdef int status
    while i < n:
        if s[i] < 0x80:
            i = _skip_ascii(s, i, n)
            continue
        status = _utf8_unit(s + i, n - i, &ln)
        if status == U_VALID:
            i += ln
            continue
        memcpy(w, s + run, i - run)
        w += i - run
        if status == U_TRUNCATED:
            consumed[0] = i
            return w - out
        w = _put_replacement(w)
        i += ln
        run = i
    memcpy(w, s + run, i - run)
    w += i - run
    consumed[0] = n
    return w - out


cdef object _payload_problem(int frame_type, const unsigned char* p, Py_ssize_t n):
    """(ErrorCode, reason) when a known frame's payload breaks its kind's rules, else None."""
    if frame_type == K_CHECKPOINT:
        return None
    name = _FRAME_NAMES[frame_type]
    cdef Py_ssize_t bad = _utf8_error_at(p, n)
    if bad >= 0:
        return (ErrorCode.BAD_UTF8,
                f"{name} payload is not valid UTF-8 (byte {bad} of the payload)")
    if frame_type == K_TOKEN or frame_type == K_LOG:
        return None
    text = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    try:
        value = _json_loads(text)
    except _JSONDecodeError as exc:
        return (ErrorCode.BAD_JSON,
                f"{name} payload is not valid JSON ({exc.msg} at character {exc.pos})")
    except RecursionError:
        return (ErrorCode.BAD_JSON, f"{name} payload is not valid JSON (nested too deeply)")
    if not isinstance(value, dict):
        return (ErrorCode.BAD_JSON, f"{name} payload is not a JSON object (it is a JSON "
                                    f"{_JSON_TYPE_NAMES[type(value)]})")
    if frame_type == K_TURN_END and not isinstance(value.get("status"), str):
        return (ErrorCode.BAD_JSON, 'TURN_END payload has no string "status"')
    return None


# --- StreamBatch encoding (take) -----------------------------------------------------------

cdef struct batch_plan:
    # the log as take() reads it (TokenStream's arrays; arena[0] is at absolute offset abase)
    const uint64_t* ends
    const uint8_t* kinds
    const uint8_t* codes
    const unsigned char* arena
    uint64_t abase
    # the batch: log entries first..stop-1, seqs from start, stored bytes from offset pos0
    size_t first
    size_t stop
    uint64_t start
    uint64_t pos0
    # sizes of its fields: the tokens' text (2), their lengths (3), the other entries (4)
    uint64_t text_len
    uint64_t lengths_len
    uint64_t events_len      # every StreamEvent with its tag and length
    size_t n_tokens
    size_t n_events


cdef inline void _fit_batch(batch_plan* b, size_t last, uint64_t max_bytes) noexcept nogil:
    """Pass 1 of take(): how many of the entries b.first..last-1 fit in max_bytes (the first
    always does); sets b.stop and the field sizes."""
    cdef const uint64_t* ends = b.ends
    cdef const uint8_t* kinds = b.kinds
    cdef const uint8_t* codes = b.codes
    cdef size_t first = b.first
    cdef uint64_t start = b.start
    cdef uint64_t prev = b.pos0
    cdef uint64_t size, cost, event_size
    cdef uint64_t used = BATCH_OVH
    cdef uint64_t text_len = 0, lengths_len = 0, events_len = 0
    cdef size_t n_tokens = 0, n_events = 0
    cdef size_t j = first
    while j < last:
        size = ends[j] - prev
        if kinds[j] == K_TOKEN:
            cost = size + _vlen(size)
        else:
            event_size = _event_size(start + (j - first), kinds[j], codes[j], size)
            cost = 1 + _vlen(event_size) + event_size
        if j > first and used + cost > max_bytes:
            break
        used += cost
        if kinds[j] == K_TOKEN:
            text_len += size
            lengths_len += cost - size
            n_tokens += 1
        else:
            events_len += cost
            n_events += 1
        prev = ends[j]
        j += 1
    b.stop = j
    b.text_len = text_len
    b.lengths_len = lengths_len
    b.events_len = events_len
    b.n_tokens = n_tokens
    b.n_events = n_events


cdef inline unsigned char* _put_text(unsigned char* w, const batch_plan* b) noexcept nogil:
    """Field 2: the batch's tokens' text, copied from the arena in runs between events."""
    cdef const uint64_t* ends = b.ends
    cdef const uint8_t* kinds = b.kinds
    cdef const unsigned char* arena = b.arena
    cdef uint64_t abase = b.abase
    cdef uint64_t prev = b.pos0
    cdef uint64_t run_start = b.pos0
    cdef size_t j
    w[0] = 0x12
    w = _put_varint(w + 1, b.text_len)
    if b.n_events == 0:
        memcpy(w, arena + (prev - abase), b.text_len)
        return w + b.text_len
    for j in range(b.first, b.stop):
        if kinds[j] != K_TOKEN:
            memcpy(w, arena + (run_start - abase), prev - run_start)
            w += prev - run_start
            run_start = ends[j]
        prev = ends[j]
    memcpy(w, arena + (run_start - abase), prev - run_start)
    return w + (prev - run_start)


cdef inline unsigned char* _put_lengths(unsigned char* w, const batch_plan* b) noexcept nogil:
    """Field 3: the tokens' lengths, packed varints."""
    cdef const uint64_t* ends = b.ends
    cdef const uint8_t* kinds = b.kinds
    cdef uint64_t prev = b.pos0
    cdef size_t j
    w[0] = 0x1A
    w = _put_varint(w + 1, b.lengths_len)
    for j in range(b.first, b.stop):
        if kinds[j] == K_TOKEN:
            w = _put_varint(w, ends[j] - prev)
        prev = ends[j]
    return w


cdef inline unsigned char* _put_event(unsigned char* w, uint64_t seq, uint8_t kind,
                                      uint8_t code, const unsigned char* data,
                                      uint64_t size) noexcept nogil:
    """Field 4, one StreamEvent: seq, kind, then an ERROR's code and message or another
    entry's payload."""
    w[0] = 0x22
    w = _put_varint(w + 1, _event_size(seq, kind, code, size))
    w[0] = 0x08
    w = _put_varint(w + 1, seq)
    w[0] = 0x10
    w = _put_varint(w + 1, kind)
    if kind == K_ERROR:
        w[0] = 0x20
        w = _put_varint(w + 1, code)
        if size:
            w[0] = 0x2A
            w = _put_varint(w + 1, size)
            memcpy(w, data, size)
            w += size
    elif size:
        w[0] = 0x1A
        w = _put_varint(w + 1, size)
        memcpy(w, data, size)
        w += size
    return w


cdef inline unsigned char* _put_events(unsigned char* w, const batch_plan* b) noexcept nogil:
    """Field 4 for every entry of the batch that is not a token, in seq order."""
    cdef const uint64_t* ends = b.ends
    cdef const uint8_t* kinds = b.kinds
    cdef const uint8_t* codes = b.codes
    cdef const unsigned char* arena = b.arena
    cdef uint64_t abase = b.abase
    cdef uint64_t prev = b.pos0
    cdef uint64_t seq0 = b.start - b.first  # seq of log index j is seq0 + j
    cdef size_t j
    for j in range(b.first, b.stop):
        if kinds[j] != K_TOKEN:
            w = _put_event(w, seq0 + j, kinds[j], codes[j], arena + (prev - abase),
                           ends[j] - prev)
        prev = ends[j]
    return w


def encode_frame(int frame_type, payload=b""):
    """One protocol v1 frame: u32 LE payload length, u8 type, payload.

    Raises:
        ValueError: the type is not a byte, or the payload is 4 GiB or more.
    """
    if not 0 <= frame_type <= 0xFF:
        raise ValueError(f"frame type must be a byte (0-255), got {frame_type}")
    cdef bytes data = bytes(payload)
    cdef Py_ssize_t n = len(data)
    if n > 0xFFFFFFFF:
        raise ValueError(f"frame payload of {n} bytes does not fit a u32 length")
    out = PyBytes_FromStringAndSize(NULL, HEADER + n)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
    w[0] = n & 0xFF
    w[1] = (n >> 8) & 0xFF
    w[2] = (n >> 16) & 0xFF
    w[3] = (n >> 24) & 0xFF
    w[4] = <unsigned char>frame_type
    memcpy(w + HEADER, PyBytes_AS_STRING(data), n)
    return out


cdef class Cursor:
    """A subscriber's position in one stream; pass it to `TokenStream.take()`."""

    def statistics(self):
        return CursorStatistics(self.next_seq, self._batches, self._entries, self._bytes,
                                self._lost)

    def __repr__(self):
        return f"<Cursor next_seq={self.next_seq}>"


cdef class TokenStream:
    """One agent output stream: decoder, bounded replay log and subscriber cursors.

    Args:
        mode: "frames" for the protocol v1 events fd, "text" for a plain agent's output
            (UTF-8, invalid bytes replaced), "bytes" for output kept byte-exact (one entry
            per feed, no decoding).
        log_bytes: replay log budget in bytes (stored bytes + ENTRY_OVERHEAD per entry).
        max_frame_bytes: the largest frame payload accepted, in bytes.

    Raises:
        ValueError: an argument is out of range.
    """

    def __cinit__(self):
        self._arena = NULL
        self._ends = NULL
        self._kinds = NULL
        self._codes = NULL
        self._pbuf = NULL

    def __init__(self, mode="frames", *, log_bytes=DEFAULT_LOG_BYTES,
                 max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, first_seq=1):
        check_stream_args(mode, log_bytes, max_frame_bytes, first_seq)
        self._text_mode = mode == "text"
        self._bytes_mode = mode == "bytes"
        self._log_limit = log_bytes
        self._max_frame = max_frame_bytes
        self.first_seq = first_seq
        self.next_seq = first_seq
        self._events = deque()
        self._cursors = set()

    def __dealloc__(self):
        free(self._arena)
        free(self._ends)
        free(self._kinds)
        free(self._codes)
        free(self._pbuf)

    # --- input -------------------------------------------------------------------------

    def feed(self, data):
        """Decode more of the stream; returns how many log entries it appended.

        Raises:
            StreamClosedError: close() was called before.
        """
        cdef Py_buffer view
        cdef uint64_t before, base
        if self.closed:
            raise StreamClosedError("feed() after close(): the stream has ended")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            base = self._bytes_fed
            self._bytes_fed += view.len
            if self.failed:
                self._bytes_discarded += view.len
                return 0
            before = self.next_seq
            if self._bytes_mode:
                if view.len:
                    self._tokens += 1
                    self._token_bytes += view.len
                    self._append(<const unsigned char*>view.buf, view.len, K_TOKEN, 0)
            elif self._text_mode:
                self._feed_text(<const unsigned char*>view.buf, view.len)
            else:
                self._feed_frames(<const unsigned char*>view.buf, view.len, base)
            return self.next_seq - before
        finally:
            PyBuffer_Release(&view)

    cdef int _feed_frames(self, const unsigned char* p, Py_ssize_t n, uint64_t base) except -1:
        cdef Py_ssize_t pos = 0
        cdef size_t k, need
        cdef uint32_t length
        cdef uint32_t max_frame = self._max_frame
        if self._plen:
            # finish the frame the previous feed() left incomplete
            if self._plen < HEADER:
                k = min(<size_t>(HEADER - self._plen), <size_t>n)
                self._pbuf_room(self._plen + k)
                memcpy(self._pbuf + self._plen, p, k)
                self._plen += k
                pos = k
                if self._plen < HEADER:
                    return 0
                length = _u32le(self._pbuf)
                if length > max_frame:
                    return self._fail(self._pend_off, length, self._plen + n - pos)
            length = _u32le(self._pbuf)
            need = HEADER + <size_t>length
            k = min(need - self._plen, <size_t>(n - pos))
            self._pbuf_room(self._plen + k)
            memcpy(self._pbuf + self._plen, p + pos, k)
            self._plen += k
            pos += k
            if self._plen < need:
                return 0
            self._plen = 0
            self._frame(self._pbuf[4], self._pbuf + HEADER, length, self._pend_off)
        while n - pos >= HEADER:
            length = _u32le(p + pos)
            if length > max_frame:
                return self._fail(base + pos, length, n - pos)
            if <size_t>(n - pos - HEADER) < length:
                break
            self._frame(p[pos + 4], p + pos + HEADER, length, base + pos)
            pos += HEADER + length
        if pos < n:
            self._pbuf_room(n - pos)
            memcpy(self._pbuf, p + pos, n - pos)
            self._plen = n - pos
            self._pend_off = base + pos
        return 0

    cdef inline int _frame(self, uint8_t frame_type, const unsigned char* payload, size_t length,
                           uint64_t offset) except -1:
        self._frames += 1
        if frame_type == K_TOKEN and _utf8_error_at(payload, length) < 0:
            self._tokens += 1
            self._token_bytes += length
            return self._append(payload, length, K_TOKEN, 0)
        return self._slow_frame(frame_type, payload, length, offset)

    cdef int _slow_frame(self, uint8_t frame_type, const unsigned char* payload, size_t length,
                         uint64_t offset) except -1:
        if frame_type < K_TOKEN or frame_type > K_TOOL_CALL:
            return self._error(
                E_UNKNOWN_FRAME_TYPE,
                f"frame at byte {offset}: unknown frame type 0x{frame_type:02x}; "
                f"its {length}-byte payload is skipped")
        problem = _payload_problem(frame_type, payload, length)
        if problem is not None:
            return self._error(problem[0], f"frame at byte {offset}: {problem[1]}; frame skipped")
        data = PyBytes_FromStringAndSize(<const char*>payload, length)
        self._n_events += 1
        self._append(payload, length, frame_type, 0)
        self._events.append(StreamEvent(self.next_seq - 1, EventKind(frame_type), data,
                                        ErrorCode.NONE, ""))
        return 0

    cdef int _fail(self, uint64_t offset, uint64_t length, uint64_t remaining) except -1:
        self.failed = True
        self._bytes_discarded += remaining
        self._plen = 0
        return self._error(
            E_FRAME_TOO_LARGE,
            f"frame at byte {offset}: length {length} exceeds the {self._max_frame}-byte frame "
            f"limit; framing is lost, the rest of the stream is ignored")

    cdef int _error(self, int code, str message) except -1:
        cdef bytes stored = message.encode("utf-8")
        self._errors += 1
        self._append(<const unsigned char*>PyBytes_AS_STRING(stored), len(stored), K_ERROR,
                     code)
        self._events.append(StreamEvent(self.next_seq - 1, EventKind.ERROR, b"",
                                        ErrorCode(code), message))
        return 0

    cdef int _feed_text(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef unsigned char tmp[8]
        cdef unsigned char* out
        cdef Py_ssize_t i = 0, o = 0, ln, consumed, m, have
        cdef int status
        # worst case: every byte becomes a 3-byte U+FFFD
        self._arena_room(3 * (<size_t>n + 4))
        out = self._arena + self._arena_len
        if self._tail_len:
            have = self._tail_len
            m = min(<Py_ssize_t>4 - have, n)
            memcpy(tmp, self._tail, have)
            memcpy(tmp + have, p, m)
            status = _utf8_unit(tmp, have + m, &ln)
            if status == U_TRUNCATED:  # still cut: m == n here
                memcpy(self._tail, tmp, have + m)
                self._tail_len = have + m
                return 0
            if status == U_VALID:
                memcpy(out, tmp, ln)
                o = ln
            else:
                _put_replacement(out)
                o = 3
            i = ln - have  # the tail is a valid prefix, so ln >= have
            self._tail_len = 0
        o += _utf8_replace(p + i, n - i, out + o, &consumed)
        i += consumed
        if i < n:
            memcpy(self._tail, p + i, n - i)
            self._tail_len = n - i
        if o:
            self._tokens += 1
            self._token_bytes += o
            self._commit(o, K_TOKEN, 0)
        return 0

    def close(self):
        """End of input: flush a partial code point, or report a partial frame.

        Returns how many log entries it appended; a second call does nothing.
        """
        cdef uint64_t before = self.next_seq
        cdef size_t have
        if self.closed:
            return 0
        self.closed = True
        if self._text_mode:
            if self._tail_len:
                self._tail_len = 0
                self._tokens += 1
                self._token_bytes += 3
                self._append(<const unsigned char*>b"\xef\xbf\xbd", 3, K_TOKEN, 0)
        elif not self.failed and self._plen:
            have = self._plen
            if have < HEADER:
                message = (f"stream ended inside the frame header at byte {self._pend_off}: "
                           f"{have} of {HEADER_SIZE} bytes received")
            else:
                message = (f"stream ended inside the frame at byte {self._pend_off} "
                           f"(type 0x{self._pbuf[4]:02x}, length {_u32le(self._pbuf)}): "
                           f"{have} of {HEADER + _u32le(self._pbuf)} bytes received")
            self._bytes_discarded += have
            self._plen = 0
            self._error(E_TRUNCATED_FRAME, message)
        return self.next_seq - before

    def append_event(self, kind, payload=b""):
        """Append a runtime-made entry (e.g. a TURN_END after a forced stop); returns its seq.

        TOKEN is accepted too, for text the runtime merges into the stream itself (a plain
        agent's stdout in a session); its payload must be valid UTF-8. The entry is not
        queued for next_event(): its caller already knows it.

        Raises:
            ValueError: kind is not TOKEN..TOOL_CALL, or the payload breaks its kind's rules.
        """
        check_appended_kind(kind)
        cdef bytes data = bytes(payload)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t bad
        if kind == K_TOKEN:
            bad = _utf8_error_at(p, len(data))
            if bad >= 0:
                raise ValueError(
                    f"TOKEN payload is not valid UTF-8 (byte {bad} of the payload)")
            self._tokens += 1
            self._token_bytes += len(data)
            self._append(p, len(data), K_TOKEN, 0)
            return self.next_seq - 1
        problem = _payload_problem(kind, p, len(data))
        if problem is not None:
            raise ValueError(problem[1])
        self._n_events += 1
        self._append(p, len(data), <uint8_t>kind, 0)
        return self.next_seq - 1

    def pending_input(self):
        """The bytes fed that are not part of an entry yet: a frame cut by the end of the
        last read (frames mode) or a cut UTF-8 sequence (text mode); b"" in bytes mode and
        once framing is lost. Live restore's journal starts a segment with them."""
        if self.failed:
            return b""
        if self._text_mode:
            return PyBytes_FromStringAndSize(<const char*>self._tail, self._tail_len)
        return PyBytes_FromStringAndSize(<const char*>self._pbuf, self._plen)

    def next_event(self):
        """The oldest non-token entry not pulled yet (errors included), or None."""
        if self._events:
            return self._events.popleft()
        return None

    # --- log storage ---------------------------------------------------------------------

    cdef inline int _append(self, const unsigned char* data, size_t length, uint8_t kind,
                            uint8_t code) except -1:
        if self._arena_cap - self._arena_len < length:
            self._arena_room(length)
        if length:
            memcpy(self._arena + self._arena_len, data, length)
        return self._commit(length, kind, code)

    cdef inline int _commit(self, size_t length, uint8_t kind, uint8_t code) except -1:
        """Make the `length` bytes just written after the arena's end one new entry."""
        cdef size_t e = self._elen
        if e == self._ecap:
            self._entries_room()
            e = self._elen
        self._arena_len += length
        self._ends[e] = self._arena_base + self._arena_len
        self._kinds[e] = kind
        self._codes[e] = code
        self._elen = e + 1
        self.next_seq += 1
        self._log_bytes += length + OVERHEAD
        if self._log_bytes > self._log_limit:
            self._evict()
        return 0

    cdef void _evict(self) noexcept:
        cdef size_t head = self._ehead
        cdef size_t last = self._elen - 1
        cdef uint64_t start = self._start_abs
        cdef uint64_t end
        while self._log_bytes > self._log_limit and head < last:
            end = self._ends[head]
            self._log_bytes -= end - start + OVERHEAD
            start = end
            head += 1
        self._evicted += head - self._ehead
        self.first_seq += head - self._ehead
        self._start_abs = start
        self._ehead = head

    cdef int _arena_room(self, size_t need) except -1:
        """Make room for `need` more bytes: drop the evicted prefix, grow when that is not
        enough to leave half the arena free (so each byte is moved O(1) times)."""
        cdef size_t dead = self._start_abs - self._arena_base
        cdef size_t live = self._arena_len - dead
        cdef size_t cap
        cdef unsigned char* grown
        if self._arena_cap - self._arena_len >= need:
            return 0
        if dead and (live + need) * 2 <= self._arena_cap:
            memmove(self._arena, self._arena + dead, live)
        else:
            cap = max(self._arena_cap * 2, (live + need) * 2, <size_t>65536)
            grown = <unsigned char*>malloc(cap)
            if grown == NULL:
                raise MemoryError(f"token log arena of {cap} bytes")
            if live:
                memcpy(grown, self._arena + dead, live)
            free(self._arena)
            self._arena = grown
            self._arena_cap = cap
        self._arena_len = live
        self._arena_base = self._start_abs
        return 0

    cdef int _entries_room(self) except -1:
        cdef size_t dead = self._ehead
        cdef size_t live = self._elen - dead
        cdef size_t cap
        cdef void* p
        if dead and (live + 1) * 2 <= self._ecap:
            memmove(self._ends, self._ends + dead, live * sizeof(uint64_t))
            memmove(self._kinds, self._kinds + dead, live)
            memmove(self._codes, self._codes + dead, live)
        else:
            if dead:
                memmove(self._ends, self._ends + dead, live * sizeof(uint64_t))
                memmove(self._kinds, self._kinds + dead, live)
                memmove(self._codes, self._codes + dead, live)
            cap = max(self._ecap * 2, <size_t>4096)
            p = realloc(self._ends, cap * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError(f"token log index of {cap} entries")
            self._ends = <uint64_t*>p
            p = realloc(self._kinds, cap)
            if p == NULL:
                raise MemoryError(f"token log index of {cap} entries")
            self._kinds = <uint8_t*>p
            p = realloc(self._codes, cap)
            if p == NULL:
                raise MemoryError(f"token log index of {cap} entries")
            self._codes = <uint8_t*>p
            self._ecap = cap
        self._ehead = 0
        self._elen = live
        return 0

    cdef int _pbuf_room(self, size_t need) except -1:
        cdef size_t cap
        cdef void* p
        if need <= self._pcap:
            return 0
        cap = max(need, self._pcap * 2, <size_t>256)
        p = realloc(self._pbuf, cap)
        if p == NULL:
            raise MemoryError(f"frame buffer of {cap} bytes")
        self._pbuf = <unsigned char*>p
        self._pcap = cap
        return 0

    # --- log -----------------------------------------------------------------------------

    def get(self, seq):
        """The log entry with this seq, tokens included (slow path: tests, debugging).

        Raises:
            SeqEvictedError: the entry was evicted.
            ValueError: seq is below 1 or not written yet.
        """
        check_held_seq(seq, self.first_seq, self.next_seq)
        cdef size_t e = self._ehead + <size_t>(seq - self.first_seq)
        cdef uint64_t start = self._ends[e - 1] if e > self._ehead else self._start_abs
        stored = PyBytes_FromStringAndSize(
            <const char*>(self._arena + (start - self._arena_base)), self._ends[e] - start)
        if self._kinds[e] == K_ERROR:
            return StreamEvent(seq, EventKind.ERROR, b"", ErrorCode(self._codes[e]),
                               stored.decode())
        return StreamEvent(seq, EventKind(self._kinds[e]), stored)

    # --- subscribers -------------------------------------------------------------------

    def subscribe(self, from_seq=None):
        """A new cursor starting at from_seq (default: the oldest entry still held).

        A from_seq that was already evicted is accepted: the first batch reports the loss.

        Raises:
            ValueError: from_seq is below 1 or beyond next_seq.
        """
        cdef uint64_t start = subscription_start(from_seq, self.first_seq, self.next_seq)
        cdef Cursor cursor = Cursor.__new__(Cursor)
        cursor._stream = self
        cursor._subscribed = True
        cursor.next_seq = start
        self._cursors.add(cursor)
        return cursor

    def unsubscribe(self, cursor):
        """Forget a cursor; taking with it afterwards is an error. Idempotent."""
        cdef Cursor c = self._check_cursor(cursor, True)
        c._subscribed = False
        self._cursors.discard(c)

    cdef Cursor _check_cursor(self, object cursor, bint allow_unsubscribed):
        if not isinstance(cursor, Cursor):
            raise TypeError(f"expected a Cursor from subscribe(), got {type(cursor).__name__}")
        cdef Cursor c = <Cursor>cursor
        if c._stream is not self:
            raise ValueError("cursor belongs to another stream")
        if not c._subscribed and not allow_unsubscribed:
            raise ValueError("cursor was unsubscribed")
        return c

    def take(self, cursor, Py_ssize_t max_bytes=DEFAULT_TAKE_BYTES):
        """The next encoded `corral.v1.StreamBatch` for this cursor, or None when caught up.

        The batch is at most max_bytes long unless its first entry alone is larger (then it
        holds just that entry), and it advances the cursor past what it holds.

        Raises:
            ValueError: max_bytes is below 1, or the cursor is not this stream's.
        """
        cdef Cursor c = self._check_cursor(cursor, False)
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        cdef batch_plan b
        cdef uint64_t next_seq = self.next_seq
        cdef uint64_t lost = 0
        b.start = c.next_seq
        if b.start < self.first_seq:
            lost = self.first_seq - b.start
            b.start = self.first_seq
        if b.start >= next_seq:
            return None
        b.ends = self._ends
        b.kinds = self._kinds
        b.codes = self._codes
        b.arena = self._arena
        b.abase = self._arena_base
        b.first = self._ehead + <size_t>(b.start - self.first_seq)
        b.pos0 = b.ends[b.first - 1] if b.first > self._ehead else self._start_abs
        _fit_batch(&b, self._elen, <uint64_t>max_bytes)

        cdef uint64_t lost_size = 0
        cdef uint64_t total = 1 + _vlen(b.start) + 1 + _vlen(next_seq) + b.events_len
        if b.text_len:
            total += 1 + _vlen(b.text_len) + b.text_len
        if b.n_tokens:
            total += 1 + _vlen(b.lengths_len) + b.lengths_len
        if lost:
            lost_size = 1 + _vlen(c.next_seq) + 1 + _vlen(lost)
            total += 1 + _vlen(lost_size) + lost_size

        # pass 2: write the wire format into the bytes object we hand out
        out = PyBytes_FromStringAndSize(NULL, total)
        cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
        w[0] = 0x08
        w = _put_varint(w + 1, b.start)
        if b.text_len:
            w = _put_text(w, &b)
        if b.n_tokens:
            w = _put_lengths(w, &b)
        if b.n_events:
            w = _put_events(w, &b)
        if lost:  # field 5, DataLost: from seq, count
            w[0] = 0x2A
            w = _put_varint(w + 1, lost_size)
            w[0] = 0x08
            w = _put_varint(w + 1, c.next_seq)
            w[0] = 0x10
            w = _put_varint(w + 1, lost)
        w[0] = 0x30
        w = _put_varint(w + 1, next_seq)
        assert w == <unsigned char*>PyBytes_AS_STRING(out) + total, "StreamBatch size mismatch"

        c.next_seq = b.start + (b.stop - b.first)
        c._batches += 1
        c._entries += b.stop - b.first
        c._bytes += total
        c._lost += lost
        return out

    # --- introspection -----------------------------------------------------------------

    def statistics(self):
        cdef uint64_t lag = 0
        cdef Py_ssize_t lagged = 0
        cdef Cursor c
        for c in self._cursors:
            lag = max(lag, self.next_seq - c.next_seq)
            if c.next_seq < self.first_seq:
                lagged += 1
        return stream_statistics(self, self._mode_name(), lag, lagged)

    cdef str _mode_name(self):
        return "bytes" if self._bytes_mode else "text" if self._text_mode else "frames"

    def __repr__(self):
        return (f"<TokenStream {self._mode_name()} seq {self.first_seq}..{self.next_seq - 1} "
                f"log {self._log_bytes}/{self._log_limit} B>")
