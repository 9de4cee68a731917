# The C-level layout of the compiled token stream core (ext/_stream.pyx); see _stream_py.py
# for the rules both implementations keep.
cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t


@cython.final
cdef class Cursor:
    cdef TokenStream _stream
    cdef bint _subscribed
    cdef readonly uint64_t next_seq   # the seq this cursor's next batch starts at
    cdef uint64_t _batches
    cdef uint64_t _entries
    cdef uint64_t _bytes
    cdef uint64_t _lost


# The counters and log bounds are readonly so that one function, _stream_py.stream_statistics,
# makes statistics() of both implementations.
@cython.final
cdef class TokenStream:
    cdef bint _text_mode
    cdef bint _bytes_mode              # one TOKEN entry per feed, bytes kept as they came
    cdef readonly bint failed          # framing was lost; input after that point is ignored
    cdef readonly bint closed          # close() was called: the input has ended
    cdef readonly uint64_t _log_limit  # bytes
    cdef uint32_t _max_frame          # payload bytes of one frame

    # The log. Entry e (_ehead <= e < _elen) has seq first_seq + e - _ehead; its stored bytes
    # run from the previous entry's end (or _start_abs for the oldest) to _ends[e]. Offsets
    # are absolute stream-of-log offsets; _arena[0] sits at absolute offset _arena_base.
    cdef unsigned char* _arena
    cdef size_t _arena_cap
    cdef size_t _arena_len
    cdef uint64_t _arena_base
    cdef uint64_t _start_abs
    cdef uint64_t* _ends
    cdef uint8_t* _kinds
    cdef uint8_t* _codes
    cdef size_t _ecap
    cdef size_t _ehead
    cdef size_t _elen
    cdef readonly uint64_t first_seq   # the oldest seq in the log (next_seq when it is empty)
    cdef readonly uint64_t next_seq    # the seq the next entry will get
    cdef readonly uint64_t _log_bytes  # stored bytes + ENTRY_OVERHEAD per entry

    # Decoder state: a frame not complete yet (frames mode), a cut code point (text mode).
    cdef unsigned char* _pbuf
    cdef size_t _pcap
    cdef size_t _plen
    cdef uint64_t _pend_off           # stream offset of _pbuf[0]
    cdef unsigned char _tail[4]
    cdef Py_ssize_t _tail_len

    cdef readonly object _events  # deque of StreamEvent for next_event()
    cdef readonly object _cursors  # set of subscribed Cursor

    # counters for statistics()
    cdef readonly uint64_t _bytes_fed
    cdef readonly uint64_t _bytes_discarded
    cdef readonly uint64_t _frames
    cdef readonly uint64_t _tokens
    cdef readonly uint64_t _token_bytes
    cdef readonly uint64_t _n_events
    cdef readonly uint64_t _errors
    cdef readonly uint64_t _evicted

    cdef int _feed_frames(self, const unsigned char* p, Py_ssize_t n, uint64_t base) except -1
    cdef int _feed_text(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int _frame(self, uint8_t frame_type, const unsigned char* payload, size_t length,
                    uint64_t offset) except -1
    cdef int _slow_frame(self, uint8_t frame_type, const unsigned char* payload,
                         size_t length, uint64_t offset) except -1
    cdef int _fail(self, uint64_t offset, uint64_t length, uint64_t remaining) except -1
    cdef int _error(self, int code, str message) except -1
    cdef int _append(self, const unsigned char* data, size_t length, uint8_t kind,
                     uint8_t code) except -1
    cdef int _commit(self, size_t length, uint8_t kind, uint8_t code) except -1
    cdef int _arena_room(self, size_t need) except -1
    cdef int _entries_room(self) except -1
    cdef int _pbuf_room(self, size_t need) except -1
    cdef void _evict(self) noexcept
    cdef str _mode_name(self)
    cdef Cursor _check_cursor(self, object cursor, bint allow_unsubscribed)
