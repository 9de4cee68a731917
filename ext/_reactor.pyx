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


DEFAULT_MAX_EVENTS = 64


@cython.final
cdef class Reactor:
    """An epoll set of non-blocking fds, each feeding a token stream.

    Args:
        read_budget: bytes one read takes at most (the shared buffer's size).
        max_events: ready fds served per drain() at most.
        on_error: called as on_error(owner, exc) when a stream or an owner raises.
    """

    cdef int _epfd
    cdef dict _entries          # fd -> (owner, feed)
    cdef unsigned char* _buf
    cdef Py_ssize_t _budget
    cdef object _view           # memoryview over _buf
    cdef epoll_event* _events
    cdef int _max_events
    cdef object _on_error
    cdef readonly unsigned long long drains     # drain() calls
    cdef readonly unsigned long long reads      # read(2) calls made
    cdef readonly unsigned long long bytes_read

    def __cinit__(self):
        self._epfd = -1
        self._buf = NULL
        self._events = NULL

    def __init__(self, Py_ssize_t read_budget, int max_events=DEFAULT_MAX_EVENTS, *,
                 on_error=None):
        if read_budget < 1:
            raise ValueError(f"read_budget must be at least 1 byte, got {read_budget}")
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self._buf = <unsigned char*>malloc(read_budget)
        self._events = <epoll_event*>malloc(max_events * sizeof(epoll_event))
        if self._buf == NULL or self._events == NULL:
            raise MemoryError()
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, strerror(errno).decode())
        self._budget = read_budget
        self._max_events = max_events
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

    def close(self):
        """Close the epoll fd; registered fds are not touched (their owners close them)."""
        if self._epfd >= 0:
            c_close(self._epfd)
            self._epfd = -1
        self._entries.clear()

    def drain(self):
        """Serve every ready fd once (at most max_events); returns how many were ready."""
        cdef int n, i, fd
        cdef ssize_t r
        cdef int err
        if self._epfd < 0:
            return 0
        self.drains += 1
        n = epoll_wait(self._epfd, self._events, self._max_events, 0)
        if n < 0:
            if errno == EINTR:
                return 0
            raise OSError(errno, strerror(errno).decode())
        for i in range(n):
            fd = self._events[i].data.fd
            entry = self._entries.get(fd)
            if entry is None:
                continue  # removed by an owner earlier in this drain
            owner, feed = <tuple>entry
            while True:
                r = c_read(fd, self._buf, self._budget)
                if r >= 0 or errno != EINTR:
                    break
            err = errno if r < 0 else 0
            if r < 0 and err == EAGAIN:
                continue
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
        return n
