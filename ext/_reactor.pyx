# cython: language_level=3
"""One epoll set for every agent output fd of an event loop, drained in C.

The event loop sees a single file descriptor, the reactor's epoll fd. When it turns readable,
`drain()` asks the kernel which agent fds are ready and, for each, makes one read(2) of at
most `read_budget` bytes into a buffer shared by all of them, feeds the bytes to that fd's
token stream, and tells its owner what happened with one call. Per ready fd that is one
syscall and one Python-level call, instead of an asyncio handle, a selector-key lookup, a
callback and a memoryview per fd.

The rules of runtime/streams.py hold unchanged: level-triggered (what a read leaves in a pipe
is reported again on the next drain, after the loop's other callbacks), at most one read per
fd per drain, at most `max_events` fds per drain (the rest stay ready for the next one), no
blocking call (every registered fd must be O_NONBLOCK; drain never waits).

Control before output (issue 21): a drain is also bounded in the loop thread's CPU time
(`max_drain_us`; time preempted by other processes does not count), and it
stops early when a "priority" fd turns readable (`set_priority_fds`: the daemon names gRPC's
wake-up socket, so an INPUT or INTERRUPT request that arrives during a flood of output is read
and written to its agent's control pipe before the rest of the flood). The priority fds are
polled after every `PRIORITY_EVERY` fds served once the drain has run `priority_after_us`, so
a drain always makes progress and its reads are not cut to a few fds per loop turn. The ready
fds a cut-short drain did not serve are kept and served first by the next drain, before the
kernel is asked again: no fd loses its turn (epoll would put them behind the ones served).

Owner protocol: `owner._reactor_read(n, appended)` with n > 0 bytes read and the entries the
stream appended, n == 0 at EOF, n < 0 for a read error (-errno). An exception from the stream
or the owner goes to `on_error(owner, exc)`; the other fds are still served.
"""

cimport cython
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport free, malloc
from libc.string cimport strerror


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        unsigned int u32
        unsigned long long u64

    struct epoll_event:
        unsigned int events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    int EPOLLIN
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    int EPOLL_CLOEXEC


cdef extern from "<unistd.h>" nogil:
    ssize_t c_read "read" (int fd, void* buf, size_t count)
    int c_close "close" (int fd)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    int poll(pollfd* fds, unsigned long nfds, int timeout)
    short POLLIN


cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec

    int clock_gettime(int clk_id, timespec* tp)
    int CLOCK_THREAD_CPUTIME_ID


DEFAULT_MAX_EVENTS = 64
#: a drain stops after this much of the loop thread's CPU time (the fd it is serving is
#: finished first); a bound on a flood
#: of large reads, not a ration: cut at 500 us, the reads fell behind the 256-session bench
DEFAULT_MAX_DRAIN_US = 4000
#: fds served between two looks at the priority fds
PRIORITY_EVERY = 4
#: a drain looks at the priority fds only once it has run this long: gRPC's socket is ready
#: after almost every send under load, and drains cut at 100 us starved the reads (p50 token
#: latency 3-9x under bench/sessions.py --sessions 256, against the uncut drain)
DEFAULT_PRIORITY_AFTER_US = 1000
#: priority fds at most
cdef enum:
    _MAX_PRIORITY = 8

MAX_PRIORITY_FDS = _MAX_PRIORITY


cdef inline long long _cpu_ns() nogil:
    # the loop thread's own CPU time: a drain preempted by other processes on a busy host is
    # not cut for it (wall-clock budgets cut most drains there and the reads fell behind)
    cdef timespec ts
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec


@cython.final
cdef class Reactor:
    """An epoll set of non-blocking fds, each feeding a token stream.

    Args:
        read_budget: bytes one read takes at most (the shared buffer's size).
        max_events: ready fds served per drain() at most.
        max_drain_us: CPU microseconds one drain() may take, at most one fd's service over.
        priority_after_us: CPU microseconds a drain runs before a ready priority fd cuts it.
        on_error: called as on_error(owner, exc) when a stream or an owner raises.
    """

    cdef int _epfd
    cdef dict _entries          # fd -> (owner, feed)
    cdef unsigned char* _buf
    cdef Py_ssize_t _budget
    cdef object _view           # memoryview over _buf
    cdef epoll_event* _events
    cdef int _max_events
    cdef int _next              # _events[_next:_count]: ready, not served yet
    cdef int _count
    cdef long long _max_drain_ns
    cdef long long _priority_after_ns
    cdef pollfd _priority[_MAX_PRIORITY]
    cdef int _n_priority
    cdef object _on_error
    cdef readonly unsigned long long drains     # drain() calls
    cdef readonly unsigned long long reads      # read(2) calls made
    cdef readonly unsigned long long bytes_read
    cdef readonly unsigned long long yields     # drains cut short by a ready priority fd
    cdef readonly unsigned long long time_cuts  # drains cut short by max_drain_us

    def __cinit__(self):
        self._epfd = -1
        self._buf = NULL
        self._events = NULL

    def __init__(self, Py_ssize_t read_budget, int max_events=DEFAULT_MAX_EVENTS, *,
                 long long max_drain_us=DEFAULT_MAX_DRAIN_US,
                 long long priority_after_us=DEFAULT_PRIORITY_AFTER_US, on_error=None):
        if read_budget < 1:
            raise ValueError(f"read_budget must be at least 1 byte, got {read_budget}")
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        if max_drain_us < 1:
            raise ValueError(f"max_drain_us must be at least 1, got {max_drain_us}")
        if priority_after_us < 0:
            raise ValueError(f"priority_after_us must be 0 or more, got {priority_after_us}")
        self._buf = <unsigned char*>malloc(read_budget)
        self._events = <epoll_event*>malloc(max_events * sizeof(epoll_event))
        if self._buf == NULL or self._events == NULL:
            raise MemoryError()
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, strerror(errno).decode())
        self._budget = read_budget
        self._max_events = max_events
        self._max_drain_ns = max_drain_us * 1000
        self._priority_after_ns = priority_after_us * 1000
        self._next = 0
        self._count = 0
        self._n_priority = 0
        self._view = memoryview(<unsigned char[:read_budget]>self._buf)
        self._entries = {}
        self._on_error = on_error

    def __dealloc__(self):
        if self._epfd >= 0:
            c_close(self._epfd)
        free(self._buf)
        free(self._events)

    def fileno(self):
        """The epoll fd: register it with the event loop (readable = some fd is ready)."""
        if self._epfd < 0:
            raise ValueError("the reactor is closed")
        return self._epfd

    def __len__(self):
        return len(self._entries)

    def add(self, int fd, owner, feed):
        """Serve fd (O_NONBLOCK) until remove(fd): its bytes go to feed(), news to owner."""
        cdef epoll_event ev
        if self._epfd < 0:
            raise ValueError("the reactor is closed")
        if fd in self._entries:
            raise ValueError(f"fd {fd} is already registered")
        ev.events = EPOLLIN
        ev.data.u64 = 0
        ev.data.fd = fd
        if epoll_ctl(self._epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, strerror(errno).decode())
        self._entries[fd] = (owner, feed)

    def remove(self, int fd):
        """Stop serving fd; call it before closing fd. Unknown fds are ignored."""
        cdef epoll_event ev
        if self._entries.pop(fd, None) is None:
            return
        if self._epfd >= 0:
            # an fd closed already left the set by itself (EBADF/ENOENT): nothing to undo
            epoll_ctl(self._epfd, EPOLL_CTL_DEL, fd, &ev)

    def set_priority_fds(self, fds):
        """Stop a drain early when one of these fds is readable (at most MAX_PRIORITY_FDS).

        They are only polled, never read: their owner's loop callback reads them once the
        drain has returned. An empty sequence turns the check off.
        """
        fds = [int(fd) for fd in fds]
        if len(fds) > MAX_PRIORITY_FDS:
            raise ValueError(f"at most {MAX_PRIORITY_FDS} priority fds, got {len(fds)}")
        for i, fd in enumerate(fds):
            if fd < 0:
                raise ValueError(f"priority fd {fd} is not a file descriptor")
            self._priority[i].fd = fd
            self._priority[i].events = POLLIN
        self._n_priority = len(fds)

    cdef bint _priority_ready(self):
        return (self._n_priority > 0
                and poll(self._priority, self._n_priority, 0) > 0)

    def close(self):
        """Close the epoll fd; registered fds are not touched (their owners close them)."""
        if self._epfd >= 0:
            c_close(self._epfd)
            self._epfd = -1
        self._entries.clear()
        self._next = self._count = 0

    def drain(self):
        """Serve ready fds once each: those a cut-short drain left first, else the kernel's
        (at most max_events). Stops after max_drain_us, or when a priority fd is readable.
        Returns how many ready fds this call took off its list (0: nothing was ready)."""
        cdef int n, fd
        cdef long long started, elapsed
        if self._epfd < 0:
            return 0
        self.drains += 1
        if self._next >= self._count:
            n = epoll_wait(self._epfd, self._events, self._max_events, 0)
            if n < 0:
                if errno == EINTR:
                    return 0
                raise OSError(errno, strerror(errno).decode())
            self._next = 0
            self._count = n
        started = _cpu_ns()
        n = 0
        while self._next < self._count:
            fd = self._events[self._next].data.fd
            self._next += 1
            n += 1
            self._serve(fd)
            if self._next >= self._count:
                break
            elapsed = _cpu_ns() - started
            if elapsed >= self._max_drain_ns:
                self.time_cuts += 1
                break
            if (n % PRIORITY_EVERY == 0 and elapsed >= self._priority_after_ns
                    and self._priority_ready()):
                self.yields += 1
                break
        return n

    cdef void _serve(self, int fd) except *:
        """One read(2) of fd into the shared buffer, fed to its stream, told to its owner."""
        cdef ssize_t r
        cdef int err
        entry = self._entries.get(fd)
        if entry is None:
            return  # removed by an owner earlier (in this drain or since it was cut short)
        owner, feed = <tuple>entry
        while True:
            r = c_read(fd, self._buf, self._budget)
            if r >= 0 or errno != EINTR:
                break
        err = errno if r < 0 else 0
        if r < 0 and err == EAGAIN:
            return
        self.reads += 1
        try:
            if r > 0:
                self.bytes_read += r
                owner._reactor_read(r, feed(self._view[:r]))
            elif r == 0:
                owner._reactor_read(0, 0)
            else:
                owner._reactor_read(-err, 0)
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(owner, exc)
