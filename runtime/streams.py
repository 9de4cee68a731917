"""The asyncio adapter between agent file descriptors and the token core (corral.ext).

What this module owns: reading an agent's output fds on the event loop and feeding them to a
`TokenStream` (`StreamHub`), handing subscribers their already-encoded batches as soon as
there is something to send (`Watcher`), writing control frames to an agent without ever
blocking the loop (`ControlWriter`), and creating the protocol pipes with the right fd
ownership (`AgentPipes`, `make_pipe_pair`). It knows nothing of gRPC: the servicers pass the
batches on as they are.

Rules this adapter keeps
------------------------
1. No thread per stream. Every fd is non-blocking and served by `loop.add_reader` /
   `loop.add_writer`; nothing here ever makes a blocking call.
2. One readable event is one `readv` of at most `read_budget` bytes (256 KiB; 16 KiB with the
   Python twin) into a buffer shared by every hub of the loop, so one busy agent cannot
   starve the loop: what is left in the pipe is read on the next loop iteration, after the
   other ready callbacks. A short read means the pipe is drained: no EAGAIN round trip.
3. Producer first, subscribers never in the way. The hub feeds the core and wakes only the
   watchers that are waiting; it never looks at how far a watcher has got. A slow watcher
   falls behind in the core's bounded log and learns what it lost inside its next batch.
4. Flush when the consumer is ready. A watcher that asks while data is waiting gets all of
   it (up to max_bytes) in one `take()`, without yielding to the loop; a watcher that is
   caught up sleeps on a future that the next read resolves. With `coalesce_s` > 0 a hot
   stream's tiny batches are held back to at most one per coalesce_s, which bounds the
   messages per second a watcher costs downstream (default 0: never held back).
5. Events before watchers. After each read the hub drains `next_event()` into `on_event`
   (turn ends, progress, errors; the core's event queue must be drained or it would grow),
   then wakes the watchers, so the daemon's bookkeeping always runs before any subscriber
   sees the entry.
6. Lossless hubs hold the program back instead of dropping (`StreamHub(lossless=True)`,
   bytes mode: a command's output through Sandboxes.Exec). Entries no lossless watcher has
   taken may fill `hold_bytes` of the replay log at most (a quarter by default); then the
   hub stops reading the fd, the pipe fills and the program's write(2) blocks, until a
   watcher takes enough (flow control, as Docker and E2B block the writer). The rest of the
   log keeps entries already taken, so a reader that drops and resumes with after_seq finds
   what was still in flight (taken here, but in gRPC's buffers when the client went away:
   up to its HTTP/2 receive window, which BDP probing grows to several MiB). With no watcher
   the position the last one left at holds the line. Watchers made with `lossy=True` never
   hold the program back (they may lose entries, and their batches say so).
7. Writes to an agent never block. A control frame is written at once when the pipe has
   room; the rest is queued (bounded, 4 MiB by default) and finished by `loop.add_writer`.
   Past the bound `send_input` raises `ControlQueueFull`: the agent is not reading.
8. Control before output. The compiled path's reactor drains at most 64 ready fds and at
   most 4 ms of its thread's CPU per loop callback, and after 1 ms stops early when a
   `prefer_readable` fd (gRPC's wake-up socket) is ready; the fds it left are served first
   next time. So a steering request is read and written (rule 7: straight to the pipe)
   after about 1 ms of reads at most, not after the whole flood. CPU time, not wall time:
   on a busy host a preempted drain would be cut every time, and shorter or wall-clock cuts
   ration the reads.

Fd ownership
------------
The daemon creates both protocol pipes with `AgentPipes.open()` (all four ends O_CLOEXEC,
so no other child inherits them), passes `pass_fds()` to the sandbox's exec (the spawn path
dup2()s events_w to fd 3 and control_r to fd 4, which clears O_CLOEXEC on the copies only), then
calls `close_agent_ends()` so that the agent's exit is seen as EOF. It gives `events_r` to
`StreamHub.attach_fd` and `control_w` to `ControlWriter`; both take ownership (they set
O_NONBLOCK on their own end and close it). O_NONBLOCK is a property of the open file
description, and each pipe end is its own description, so the agent's ends stay blocking.

Everything here belongs to one event loop and is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import operator
import os
import select
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corral.ext import agent as protocol
from corral.ext._stream_py import ENTRY_OVERHEAD
from corral.sandbox.errors import ControlClosed, ControlQueueFull, InvalidSpec

from .journal import EVENT_BASE, FEED, JournalError

if TYPE_CHECKING:
    from corral.ext._stream_py import StreamEvent, StreamStatistics, TokenStream

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_CONTROL_QUEUE_BYTES",
    "DEFAULT_READ_BUDGET",
    "SeqOutOfRange",
    "TWIN_READ_BUDGET",
    "AgentPipes",
    "ControlClosed",
    "ControlQueueFull",
    "ControlStatistics",
    "ControlWriter",
    "HubStatistics",
    "StreamHub",
    "Watcher",
    "WatcherStatistics",
    "make_pipe_pair",
    "pipe_capacity",
    "prefer_readable",
]

DEFAULT_READ_BUDGET = 256 << 10  # bytes read per readable event, at most (compiled core)
TWIN_READ_BUDGET = 16 << 10  # the same for the pure-Python twin, which decodes ~50x slower
DEFAULT_BATCH_BYTES = 64 << 10  # bytes of one encoded StreamBatch, at most
DEFAULT_CONTROL_QUEUE_BYTES = 4 << 20  # control bytes queued for an agent that is not reading
DEFAULT_COALESCE_ENTRIES = 64  # coalescing: a batch of fewer entries is "tiny"

# frame kinds, header and limits are the agent protocol's (corral.ext.agent, its one home)
# the payload-less control frames: at most one of each kind waits in a queue (later sends
# merge into it), so each is encoded once here
_MERGED_FRAMES = {kind: protocol.encode_frame(kind)
                  for kind in (protocol.INTERRUPT, protocol.SHUTDOWN)}


def _read_only(attr: str, doc: str | None = None) -> property:
    """A property that reads the private attribute `attr`: state only its object changes."""
    return property(operator.attrgetter(attr), doc=doc)


class SeqOutOfRange(InvalidSpec, ValueError):
    """A resume point (after_seq) past the newest entry of a stream: INVALID_ARGUMENT,
    naming the request's field. Also a ValueError, as watch() always raised."""

    def __init__(self, field: str, after_seq: int, newest: int) -> None:
        self.after_seq = after_seq
        self.newest = newest
        super().__init__(field, f"{after_seq} is past the newest entry of the stream "
                                f"(seq {newest}); resume from 0 to {newest}")


# --- pipes ----------------------------------------------------------------------------------


def make_pipe_pair(*, size: int | None = None) -> tuple[int, int]:
    """A pipe (read end, write end), both O_CLOEXEC and blocking.

    Args:
        size: capacity in bytes to ask for (F_SETPIPE_SZ). Best effort: an unprivileged
            process cannot go past /proc/sys/fs/pipe-max-size (1 MiB by default), and the
            kernel rounds up to a power-of-two number of pages; on refusal the pipe keeps
            its default (64 KiB). `pipe_capacity(fd)` says what it got.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    if size is not None:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EBUSY, errno.EINVAL):
                os.close(r)
                os.close(w)
                raise
    return r, w


def pipe_capacity(fd: int) -> int:
    """Bytes a pipe holds before a writer blocks (F_GETPIPE_SZ)."""
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


@dataclasses.dataclass
class AgentPipes:
    """The two protocol pipes of one agent; each end is an fd number, or None once closed.

    The daemon keeps `events_r` (-> StreamHub.attach_fd) and `control_w` (-> ControlWriter);
    `events_w` and `control_r` go into the sandbox as fds 3 and 4.
    """

    events_r: int | None
    events_w: int | None
    control_r: int | None
    control_w: int | None

    @classmethod
    def open(cls, *, events_pipe_bytes: int | None = 1 << 20) -> AgentPipes:
        """Both pipes, every end O_CLOEXEC.

        Args:
            events_pipe_bytes: capacity to ask for the events pipe (best effort, see
                make_pipe_pair). A larger pipe lets a fast agent run ahead of the loop
                instead of blocking every 64 KiB; None keeps the kernel default.
        """
        events_r, events_w = make_pipe_pair(size=events_pipe_bytes)
        try:
            control_r, control_w = make_pipe_pair()
        except BaseException:
            os.close(events_r)
            os.close(events_w)
            raise
        return cls(events_r, events_w, control_r, control_w)

    def pass_fds(self) -> dict[int, int]:
        """{fd number inside the sandbox: fd here}, for `Sandbox.exec(pass_fds=...)`."""
        if self.events_w is None or self.control_r is None:
            raise ValueError("the agent's pipe ends were already closed")
        return {protocol.EVENTS_FD: self.events_w, protocol.CONTROL_FD: self.control_r}

    @staticmethod
    def env() -> dict[str, str]:
        """The variables that tell an agent where its pipes are (docs/agent-protocol.md)."""
        return {protocol.PROTOCOL_ENV: str(protocol.PROTOCOL_VERSION),
                protocol.EVENTS_FD_ENV: str(protocol.EVENTS_FD),
                protocol.CONTROL_FD_ENV: str(protocol.CONTROL_FD)}

    def close_agent_ends(self) -> None:
        """Close our copies of the agent's ends, once the agent has them (or failed to start).

        Until then the events pipe cannot reach EOF: a write end is still open here.
        """
        for name in ("events_w", "control_r"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

    def close(self) -> None:
        """Close every end still held here (after a failed start, or in tests)."""
        for name in ("events_r", "events_w", "control_r", "control_w"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


# --- reading: StreamHub and Watcher ---------------------------------------------------------


_buffers = threading.local()

#: CORRAL_STREAM_REACTOR=0 makes compiled-core hubs use one loop.add_reader per fd, like the
#: twin (for A/B measurements; bench/sessions.py --daemon-env).
_USE_REACTOR = os.environ.get("CORRAL_STREAM_REACTOR", "1") != "0"
_reactors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: per loop, the fds whose readiness cuts a reactor's drain short (prefer_readable)
_priority_fds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefer_readable(loop: asyncio.AbstractEventLoop, fds: tuple[int, ...]) -> None:
    """Let the loop's callbacks for these fds run before the rest of an output drain.

    The daemon names the socket that wakes gRPC's callbacks: an INPUT or INTERRUPT request
    that arrives while the reactor drains a flood of agent output is then read and written
    to its control pipe before the flood's remaining fds are served (control before output,
    issue 21). Applies to the loop's reactors now and to those made later; () turns it off.
    The Python twin has one add_reader per fd, so the loop interleaves its reads already.
    """
    _priority_fds[loop] = tuple(fds)
    for reactor in _reactors.get(loop, {}).values():
        reactor.set_priority_fds(fds)


def _reactor_for(loop: asyncio.AbstractEventLoop, stream: Any, read_budget: int) -> Any:
    """The loop's Reactor for hubs of this read budget, made and registered on first use;
    None for the Python twin (it keeps one add_reader per fd) or without the extension."""
    if not _USE_REACTOR or type(stream).__module__ != "corral.ext._stream":
        return None
    try:
        from corral.ext._reactor import Reactor
    except ImportError:
        return None
    by_budget = _reactors.get(loop)
    if by_budget is None:
        by_budget = _reactors[loop] = {}
    reactor = by_budget.get(read_budget)
    if reactor is None:
        def on_error(owner: object, exc: BaseException) -> None:
            loop.call_exception_handler({"message": "reading an agent stream failed",
                                         "exception": exc, "hub": owner})

        reactor = by_budget[read_budget] = Reactor(read_budget, on_error=on_error)
        reactor.set_priority_fds(_priority_fds.get(loop, ()))
        loop.add_reader(reactor.fileno(), reactor.drain)
    return reactor


def _release_reactor(loop: asyncio.AbstractEventLoop, reactor: Any, fd: int) -> None:
    """Take fd out of the reactor; the last one out closes it (no epoll fd outlives use)."""
    reactor.remove(fd)
    if len(reactor):
        return
    by_budget = _reactors.get(loop, {})
    for budget, candidate in list(by_budget.items()):
        if candidate is reactor:
            del by_budget[budget]
    if not loop.is_closed():
        loop.remove_reader(reactor.fileno())
    reactor.close()


def _read_buffer(size: int) -> tuple[bytearray, memoryview]:
    """A reusable read buffer of `size` bytes for this thread (one loop per thread).

    Every hub on a loop shares it: a read is fed to the core (which copies what it keeps)
    before the callback returns, so 256 idle sessions do not hold 256 buffers.
    """
    cache = getattr(_buffers, "by_size", None)
    if cache is None:
        cache = _buffers.by_size = {}
    entry = cache.get(size)
    if entry is None:
        buf = bytearray(size)
        entry = cache[size] = (buf, memoryview(buf))
    return entry


@dataclasses.dataclass(frozen=True)
class HubStatistics:
    """A snapshot of one hub's counters (trio's `statistics()` convention)."""

    fd: int | None  # the fd being read, None when none is attached (any more)
    eof: bool  # input ended: EOF, a read error, or close()
    ended: bool  # watchers are told the stream is over once they have read the tail
    error: str | None  # the read error that ended input, e.g. "[Errno 5] Input/output error"
    readable_events: int  # times the loop reported the fd readable
    read_calls: int  # read syscalls made
    budget_cuts: int  # readable events that stopped at the budget with data maybe left
    bytes_read: int  # bytes read from the fd, ever
    max_bytes_per_event: int  # the most bytes one readable event read (<= read_budget)
    entries_appended: int  # log entries added through the hub: reads, append_event, close
    events_dispatched: int  # entries handed to on_event
    on_event_failures: int  # on_event raised (reported to the loop's exception handler)
    wakeups: int  # times a waiting watcher was woken
    watchers: int  # watchers not closed
    waiting: int  # watchers waiting for data now
    stream: StreamStatistics  # the token core's own counters
    lossless: bool = False  # flow control: the hub stops reading rather than lose entries
    paused: bool = False  # not reading now: untaken entries fill the held half of the log
    pauses: int = 0  # times reading stopped for a slow (or absent) watcher


@dataclasses.dataclass(frozen=True)
class WatcherStatistics:
    """A snapshot of one watcher's counters."""

    next_seq: int  # the seq its next batch starts at, unless it fell behind
    batches: int  # batches returned
    entries: int  # entries in those batches
    bytes: int  # encoded bytes of those batches
    lost_entries: int  # entries evicted before this watcher read them
    waits: int  # times it had to wait for data
    coalesce_waits: int  # times it held a hot stream's tiny batch back (coalesce_s)
    closed: bool


class StreamHub:
    """One token stream on the event loop: reads its fd, feeds the core, wakes watchers.

    Args:
        stream: the token core for this output (frames mode for CORRAL_EVENTS_FD, text mode
            for stdout/stderr); the hub is its only feeder.
        on_event: called synchronously with each non-token entry (StreamEvent: TURN_END,
            PROGRESS, ..., ERROR) in seq order, before watchers are woken. Exceptions it raises
            go to the loop's exception handler; reading goes on.
        read_budget: bytes one readable event reads at most; None picks DEFAULT_READ_BUDGET
            (256 KiB, under 1 ms of decoding in the compiled core) or, for the Python twin,
            TWIN_READ_BUDGET (16 KiB, a few ms), so a busy stream never holds the loop long.
        end_on_eof: when False, watchers keep waiting after input EOF until `close()`, so the
            runtime can still append its own final events (a forced TURN_END) first.
        lossless: flow control instead of loss (rule 6); needs a bytes-mode stream, whose
            entries are exactly the reads.
        hold_bytes: on a lossless hub, the log cost that entries no holding watcher has
            taken may reach before the hub stops reading (default: a quarter of the log).
            The rest of the log keeps entries already taken, for a watcher that drops and
            resumes: make it larger than what a client can have in flight (its HTTP/2
            receive window and socket buffers). One read takes at most half of the hold.
        journal: live restore's on-disk window of this stream (runtime/journal.py): each
            read goes through it (splice into the journal, then into the core), so a
            restarted daemon rebuilds the log with `restore_log`. None (the default): the
            read path is the plain one, with no extra system call.
    """

    def __init__(self, stream: TokenStream, *,
                 on_event: Callable[[StreamEvent], None] | None = None,
                 read_budget: int | None = None, end_on_eof: bool = True,
                 lossless: bool = False, hold_bytes: int | None = None,
                 journal: Any = None) -> None:
        if read_budget is None:
            twin = type(stream).__module__.endswith("._stream_py")
            read_budget = TWIN_READ_BUDGET if twin else DEFAULT_READ_BUDGET
        if read_budget < 1:
            raise ValueError(f"read_budget must be at least 1 byte, got {read_budget}")
        self._lossless = lossless
        self._hold_limit = 0
        if lossless:
            stats = stream.statistics()
            if stats.mode != "bytes":
                raise ValueError(f"a lossless hub needs a bytes-mode stream, not {stats.mode!r}")
            if stats.next_seq != stats.first_seq or stats.first_seq != stream.first_seq:
                raise ValueError("a lossless hub needs a stream nothing was fed to yet")
            limit = stats.log_bytes_limit
            hold = limit // 4 if hold_bytes is None else hold_bytes
            if not 0 < hold < limit:
                raise ValueError(f"hold_bytes must be more than 0 and less than the log's "
                                 f"{limit} bytes, got {hold}")
            read_budget = max(1, min(read_budget, hold // 2))
            # untaken entries may cost this much of the log; the rest keeps taken ones
            self._hold_limit = hold
            if read_budget + ENTRY_OVERHEAD > self._hold_limit:
                raise ValueError(f"a replay log of {limit} bytes is too small for a "
                                 f"lossless hub")
        elif hold_bytes is not None:
            raise ValueError("hold_bytes is for lossless hubs")
        self._paused = False
        self._pauses = 0
        # cumulative log cost (bytes + ENTRY_OVERHEAD) before seq _cost_seq + i is
        # _costs[_cost_head + i]; kept for the entries the log still holds (lossless only)
        self._costs: list[int] = [0]
        self._cost_head = 0
        self._cost_seq = stream.first_seq
        self._held: set[Any] = set()  # cursors of the watchers that hold the program back
        self._low_seq = stream.first_seq  # where the last of them left off, while there is none
        self._journal = journal
        if journal is not None:
            journal.bind(stream)
        self._stream = stream
        self._on_event = on_event
        self._read_budget = read_budget
        self._end_on_eof = end_on_eof
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._owns_fd = True
        self._reactor: Any = None  # the loop's Reactor serving our fd (compiled core only)
        self._eof = False
        self._ended = False
        self._error: OSError | None = None
        self._eof_event = asyncio.Event()
        # watchers waiting for any new entry, and watchers filling a batch (coalescing) that
        # wait for the stream to reach a seq: only those get woken, and only when it does
        self._waiting: dict[Watcher, asyncio.Future[None]] = {}
        self._filling: dict[Watcher, tuple[asyncio.Future[None], int]] = {}
        # plain callbacks run on every wake (the multiplexed stream's "this one has news")
        self._notify: list[Callable[[], None]] = []
        self._watchers = 0
        # counters
        self._readable_events = 0
        self._read_calls = 0
        self._budget_cuts = 0
        self._bytes_read = 0
        self._max_per_event = 0
        self._entries = 0
        self._dispatched = 0
        self._on_event_failures = 0
        self._wakeups = 0

    # --- input ------------------------------------------------------------------------

    stream = _read_only("_stream")
    eof = _read_only(
        "_eof", "Input ended (EOF, a read error, or close()); nothing more will be read.")
    ended = _read_only("_ended", "No entry will be added any more; watchers end after the tail.")
    error = _read_only(
        "_error", "The read error that ended input, or None (clean EOF, still reading, close()).")

    def attach_fd(self, fd: int, *, loop: asyncio.AbstractEventLoop | None = None,
                  owns_fd: bool = True) -> None:
        """Start reading `fd` on the loop (the running one by default).

        The fd is made non-blocking. With owns_fd (the default) the hub closes it at EOF,
        on a read error, or on close().

        Raises:
            RuntimeError: an fd is already attached, or the hub's input has ended.
        """
        if self._fd is not None:
            raise RuntimeError(f"StreamHub already reads fd {self._fd}; one fd per stream")
        if self._eof:
            raise RuntimeError("StreamHub input has ended; attach_fd() needs a new hub")
        if loop is None:
            loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop = loop
        self._fd = fd
        self._owns_fd = owns_fd
        buf, self._view = _read_buffer(self._read_budget)
        self._bufs = (buf,)
        if self._lossless and (self._untaken() + self._read_budget + ENTRY_OVERHEAD
                               > self._hold_limit):  # a restored log already holds enough
            self._paused = True
            self._pauses += 1
            return
        self._start_reading()

    def _start_reading(self) -> None:
        loop, fd = self._loop, self._fd
        assert loop is not None and fd is not None
        if self._journal is not None:  # every read goes through the journal first
            loop.add_reader(fd, self._on_readable_journaled)
            return
        reactor = _reactor_for(loop, self._stream, self._read_budget)
        if reactor is not None:
            reactor.add(fd, self, self._stream.feed)
            self._reactor = reactor
        else:
            loop.add_reader(fd, self._on_readable)

    def _stop_reading(self) -> None:
        loop, fd = self._loop, self._fd
        assert loop is not None and fd is not None
        if self._reactor is not None:
            _release_reactor(loop, self._reactor, fd)
            self._reactor = None
        else:
            loop.remove_reader(fd)

    # --- flow control (lossless hubs) ---------------------------------------------------

    def _record_read(self, n: int, appended: int) -> None:
        """Account a read's entry (bytes mode: one per read) and stop reading when the
        untaken entries fill the held half of the log."""
        self._record_cost(n, appended)
        if not self._paused and (self._untaken() + self._read_budget + ENTRY_OVERHEAD
                                 > self._hold_limit):
            self._paused = True
            self._pauses += 1
            self._stop_reading()

    def _record_cost(self, n: int, appended: int) -> None:
        costs = self._costs
        if appended:
            costs.append(costs[-1] + n + ENTRY_OVERHEAD)
            first = self._stream.first_seq
            if first > self._cost_seq:  # entries the log evicted: forget their costs
                drop = min(first - self._cost_seq, len(costs) - self._cost_head - 1)
                self._cost_head += drop
                self._cost_seq += drop
                if self._cost_head > 1024 and self._cost_head * 2 > len(costs):
                    del costs[:self._cost_head]
                    self._cost_head = 0

    def _untaken(self) -> int:
        """Log cost of the entries the slowest holding watcher has not taken."""
        held = self._held
        low = min(c.next_seq for c in held) if held else self._low_seq
        costs = self._costs
        i = low - self._cost_seq
        last = len(costs) - self._cost_head - 1
        i = 0 if i < 0 else last if i > last else i
        return costs[-1] - costs[self._cost_head + i]

    def _maybe_resume(self) -> None:
        """Read again once the holding watchers took back half of the held budget."""
        if self._paused and self._untaken() <= self._hold_limit // 2:
            self._paused = False
            if self._fd is not None:
                self._start_reading()

    def _take_held(self, cursor: Any, max_bytes: int) -> bytes | None:
        batch = self._stream.take(cursor, max_bytes)
        if self._paused and batch is not None:
            self._maybe_resume()
        return batch

    def _forget_held(self, cursor: Any) -> None:
        if cursor in self._held:
            self._held.discard(cursor)
            if not self._held:
                self._low_seq = cursor.next_seq
            self._maybe_resume()

    def release_flow_control(self) -> None:
        """Stop holding the program back from now on (its sandbox is going away): the hub
        reads to EOF, and entries no one took may be evicted. Idempotent."""
        if self._lossless:
            self._lossless = False
            self._held.clear()
            if self._paused:
                self._paused = False
                if self._fd is not None:
                    self._start_reading()

    paused = _read_only(
        "_paused", "A lossless hub that stopped reading until a watcher takes what it holds.")

    def _reactor_read(self, n: int, appended: int) -> None:
        # The compiled path's twin of _on_readable: the reactor (ext/_reactor.pyx) made the
        # read(2) and fed the core; n < 0 is -errno, 0 is EOF.
        if self._fd is None:
            return
        self._readable_events += 1
        if n <= 0:
            self._end_input(OSError(-n, os.strerror(-n)) if n else None)
            return
        self._read_calls += 1
        self._after_read(n, appended)

    def _after_read(self, n: int, appended: int) -> None:
        """Count a read of n bytes that appended entries (either path: the reactor's or
        _on_readable), then hand its events on and wake watchers waiting for entries."""
        self._bytes_read += n
        if n > self._max_per_event:
            self._max_per_event = n
        if n == self._read_budget:
            self._budget_cuts += 1
        self._entries += appended
        if self._lossless:
            self._record_read(n, appended)
        self._dispatch_events()
        if appended and (self._waiting or self._filling or self._notify):
            self._wake()

    def _on_readable(self) -> None:
        # One readv of up to read_budget bytes: the buffer is the budget, so a short read
        # means the pipe is drained (no EAGAIN round trip), and a full one leaves the rest
        # for the next loop iteration, after every other ready callback had its turn.
        fd = self._fd
        if fd is None:  # close() ran earlier in this loop iteration
            return
        self._readable_events += 1
        try:
            n = os.readv(fd, self._bufs)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO (a pty's other side), EBADF, ...: input is over
            self._end_input(exc)
            return
        self._took(n)

    def _on_readable_journaled(self) -> None:
        # _on_readable with the journal in between (live restore): the bytes leave the pipe
        # for the journal in one splice(2), then come back into the shared buffer
        fd = self._fd
        if fd is None:
            return
        self._readable_events += 1
        if self._stream.failed:  # framing is lost: what comes is dropped, not journaled
            self._journal.close()
            self._journal = None
            self._stop_reading()
            self._start_reading()
            return
        try:
            n = self._journal.read_from(fd, self._view, self._stream.next_seq)
        except BlockingIOError:
            return
        except JournalError as exc:  # tmpfs full: go on without it (the log is intact)
            self._lose_journal(exc)
            return
        except OSError as exc:
            self._end_input(exc)
            return
        self._took(n)

    def _took(self, n: int) -> None:
        """One read returned `n` bytes into the shared buffer (0: end of input): feed them."""
        self._read_calls += 1
        if n == 0:
            self._end_input(None)
            return
        self._after_read(n, self._stream.feed(self._view[:n]))

    def _lose_journal(self, exc: Exception) -> None:
        """The journal failed: this stream will not survive a restart; reading goes on."""
        loop = self._loop or asyncio.get_running_loop()
        loop.call_exception_handler({"message": "live restore: a stream's journal failed; "
                                                "it will not survive a restart",
                                     "exception": exc, "hub": self})
        self._journal.remove()
        self._journal = None
        if self._fd is not None and not self._paused:
            loop.remove_reader(self._fd)
            self._start_reading()

    journal = _read_only("_journal", "Live restore's on-disk window of the stream, or None.")
    hold_limit = _read_only("_hold_limit", "A lossless hub's hold_bytes; 0 for another hub.")

    def restore_log(self, records: list[tuple[int, bytes]]) -> list[tuple[int, int, bytes]]:
        """Feed a journal's records (runtime/journal.py Loaded.records) to a hub nothing
        was fed to or attached yet: the log comes back with the seqs it had. Returns
        (seq, kind, payload) of its non-token entries, in order, for the caller's
        bookkeeping (on_event is not called: they were handled before the restart);
        watchers are not woken.

        Raises:
            RuntimeError: the hub already read or was fed.
        """
        if self._fd is not None or self._eof or self._entries:
            raise RuntimeError("restore_log() needs a hub nothing was fed to yet")
        stream = self._stream
        events: list[tuple[int, int, bytes]] = []
        for kind, data in records:
            if kind == FEED:
                appended = stream.feed(data)
                if self._lossless:
                    self._record_cost(len(data), appended)
                event = stream.next_event()
                while event is not None:
                    events.append((event.seq, int(event.kind), event.payload))
                    event = stream.next_event()
            else:
                seq = stream.append_event(kind - EVENT_BASE, data)
                if kind - EVENT_BASE != protocol.TOKEN:
                    events.append((seq, kind - EVENT_BASE, data))
                appended = 1
            self._entries += appended
        return events

    def _dispatch_events(self) -> None:
        next_event = self._stream.next_event
        event = next_event()
        while event is not None:
            self._dispatched += 1
            if self._on_event is not None:
                try:
                    self._on_event(event)
                except Exception as exc:
                    self._on_event_failures += 1
                    loop = self._loop or asyncio.get_running_loop()
                    loop.call_exception_handler({
                        "message": f"StreamHub on_event callback failed on seq {event.seq}",
                        "exception": exc, "hub": self})
            event = next_event()

    def _detach(self) -> None:
        if self._journal is not None:  # nothing more to write; its files stay
            self._journal.close()
        fd = self._fd
        if fd is None:
            return
        assert self._loop is not None
        if not self._paused:  # a paused hub has its fd registered nowhere
            self._stop_reading()
        self._paused = False
        self._fd = None
        if self._owns_fd:
            os.close(fd)

    def _end_input(self, error: OSError | None) -> None:
        self._detach()
        self._error = error
        if not self._stream.closed:
            self._entries += self._stream.close()
        self._dispatch_events()
        self._eof = True
        self._eof_event.set()
        if self._end_on_eof:
            self._ended = True
        self._wake()

    async def wait_eof(self) -> None:
        """Wait until input has ended (EOF, a read error, or close())."""
        await self._eof_event.wait()

    def append_event(self, kind: int, payload: bytes = b"") -> int:
        """Append a runtime-made event (e.g. TURN_END "interrupted") and wake watchers.

        Returns its seq. on_event is not called for it: the caller already knows.

        Raises:
            RuntimeError: the hub has ended (watchers may already have finished).
            ValueError: the core refuses the kind or payload.
        """
        if self._ended:
            raise RuntimeError(
                "append_event() after the hub ended: its watchers may already have finished; "
                "use end_on_eof=False to add final events after EOF")
        if self._journal is not None:  # first: a kill after it leaves the entry unseen
            try:
                self._journal.append_event(kind, payload, self._stream.next_seq)
            except JournalError as exc:
                self._lose_journal(exc)
        seq = self._stream.append_event(kind, payload)
        self._entries += 1
        if self._waiting or self._filling or self._notify:
            self._wake()
        return seq

    def close(self) -> None:
        """End the hub: stop reading (closing an owned fd), close the stream, end watchers.

        Watchers still get every entry the log holds, then None. Idempotent.
        """
        if self._ended:
            return
        self._detach()
        if not self._stream.closed:
            self._entries += self._stream.close()
        self._dispatch_events()
        self._eof = True
        self._eof_event.set()
        self._ended = True
        self._wake()

    # --- watchers -----------------------------------------------------------------------

    def watch(self, after_seq: int | None = None, *, coalesce_s: float = 0.0,
              coalesce_entries: int = DEFAULT_COALESCE_ENTRIES, lossy: bool = False,
              field: str = "after_seq") -> Watcher:
        """A new subscriber.

        Args:
            after_seq: None starts at the oldest entry the log still holds; N starts at N + 1
                (a resume after seq N; 0 means from the very first entry, and the first batch
                reports anything already evicted as lost).
            coalesce_s: a batch of fewer than `coalesce_entries` entries goes out at most once
                per coalesce_s seconds: when the previous batch left less than coalesce_s ago
                (the stream is hot), the watcher waits for more until then; the wait ends
                early when coalesce_entries are there, when the hub ends and when the watcher
                closes. A cold stream's first entry goes out at once. 0 (default): never wait.
            lossy: on a lossless hub, this watcher does not hold the program back: it may
                lose entries when it is slow (its batches say so). Other hubs lose anyway.
            field: how the request names after_seq, for the error message.

        Raises:
            SeqOutOfRange: after_seq is beyond the newest entry (INVALID_ARGUMENT, and a
                ValueError).
            ValueError: after_seq is negative.
        """
        if after_seq is None:
            cursor = self._stream.subscribe()
        else:
            self.check_after_seq(after_seq, field)
            cursor = self._stream.subscribe(after_seq + 1)
        if coalesce_s < 0:
            self._stream.unsubscribe(cursor)
            raise ValueError(f"coalesce_s must be 0 or more seconds, got {coalesce_s}")
        self._watchers += 1
        held = self._lossless and not lossy
        if held:
            self._held.add(cursor)
        return Watcher(self, cursor, coalesce_s, coalesce_entries, held)

    def check_after_seq(self, after_seq: int, field: str = "after_seq") -> None:
        """What watch(after_seq) refuses, checked before anything is attached.

        Raises:
            SeqOutOfRange: after_seq is past the newest entry (INVALID_ARGUMENT).
            ValueError: after_seq is negative.
        """
        if after_seq < 0:
            raise ValueError(f"after_seq must be 0 or more, got {after_seq}")
        newest = self._stream.next_seq - 1
        if after_seq > newest:
            raise SeqOutOfRange(field, after_seq, newest)

    def add_notify(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (synchronously, on the loop) whenever entries are added and when
        the hub ends. For consumers that poll many hubs with `Watcher.take_ready()` instead
        of awaiting one future per watcher. Exceptions go to the loop's exception handler."""
        self._notify.append(callback)

    def remove_notify(self, callback: Callable[[], None]) -> None:
        """Forget a callback given to add_notify (no error when it is not there)."""
        with contextlib.suppress(ValueError):
            self._notify.remove(callback)

    def _wake(self) -> None:
        for callback in self._notify:
            try:
                callback()
            except Exception as exc:
                loop = self._loop or asyncio.get_running_loop()
                loop.call_exception_handler({
                    "message": "StreamHub notify callback failed", "exception": exc,
                    "hub": self})
        waiting = self._waiting
        if waiting:
            self._waiting = {}
            for fut in waiting.values():
                if not fut.done():
                    fut.set_result(None)
                    self._wakeups += 1
        if self._filling:
            next_seq = self._stream.next_seq
            ended = self._ended
            for watcher, (fut, target) in list(self._filling.items()):
                if ended or next_seq >= target:
                    del self._filling[watcher]
                    if not fut.done():
                        fut.set_result(None)
                        self._wakeups += 1

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            fd=self._fd,
            eof=self._eof,
            ended=self._ended,
            error=str(self._error) if self._error is not None else None,
            readable_events=self._readable_events,
            read_calls=self._read_calls,
            budget_cuts=self._budget_cuts,
            bytes_read=self._bytes_read,
            max_bytes_per_event=self._max_per_event,
            entries_appended=self._entries,
            events_dispatched=self._dispatched,
            on_event_failures=self._on_event_failures,
            wakeups=self._wakeups,
            watchers=self._watchers,
            waiting=len(self._waiting) + len(self._filling),
            stream=self._stream.statistics(),
            lossless=self._lossless,
            paused=self._paused,
            pauses=self._pauses,
        )

    def __repr__(self) -> str:
        state = "ended" if self._ended else "eof" if self._eof else f"fd {self._fd}"
        return f"<StreamHub {state} next_seq={self._stream.next_seq} watchers={self._watchers}>"


class Watcher:
    """One subscriber of a StreamHub: encoded `corral.v1.StreamBatch` bytes, as they come.

    Made by `StreamHub.watch()`. Use `await next_batch()` or `async for batch in watcher`;
    `close()` (or leaving a `with` block) unsubscribes.
    """

    __slots__ = ("_hub", "_cursor", "_take", "_coalesce_s", "_coalesce_entries", "_closed",
                 "_waiting", "_waits", "_coalesce_waits", "_last_batch_at")

    def __init__(self, hub: StreamHub, cursor: Any, coalesce_s: float,
                 coalesce_entries: int, held: bool = False) -> None:
        self._hub = hub
        self._cursor = cursor
        # a watcher that holds a lossless hub's program back lets it read again as it takes
        self._take = hub._take_held if held else hub._stream.take
        self._coalesce_s = coalesce_s
        self._coalesce_entries = coalesce_entries
        self._closed = False
        self._waiting = False
        self._waits = 0
        self._coalesce_waits = 0
        self._last_batch_at = float("-inf")  # loop time of the last batch (coalescing only)

    @property
    def next_seq(self) -> int:
        """The seq this watcher's next batch starts at, unless it fell behind."""
        return self._cursor.next_seq

    @property
    def lost_entries(self) -> int:
        """Entries evicted before this watcher read them, ever (each batch also says so)."""
        return self._cursor.statistics().lost_entries

    closed = _read_only("_closed")

    @property
    def finished(self) -> bool:
        """The hub has ended and this watcher has read everything (or it was closed)."""
        return self._closed or (self._hub._ended
                                and self._cursor.next_seq >= self._hub._stream.next_seq)

    def take_ready(self, max_bytes: int = DEFAULT_BATCH_BYTES) -> bytes | None:
        """The next encoded StreamBatch if entries are waiting, else None; never waits.

        The polling twin of next_batch() for a consumer woken by `StreamHub.add_notify`;
        `finished` tells "nothing now" from "nothing ever again".
        """
        if self._closed:
            return None
        return self._take(self._cursor, max_bytes)

    async def next_batch(self, max_bytes: int = DEFAULT_BATCH_BYTES) -> bytes | None:
        """The next encoded StreamBatch, waiting while caught up.

        Returns everything available up to max_bytes in one batch (a single larger entry
        travels alone), or None once the hub has ended and this watcher has read it all,
        or once the watcher is closed.

        Raises:
            RuntimeError: another next_batch() of this watcher is already waiting.
        """
        if self._closed:
            return None
        if self._waiting:
            raise RuntimeError("another next_batch() of this watcher is already waiting")
        if self._coalesce_s:
            return await self._next_batch_coalesced(max_bytes)
        batch = self._take(self._cursor, max_bytes)
        if batch is not None:
            return batch
        hub = self._hub
        cursor = self._cursor
        while not hub._ended:
            await self._wait_for_data(None)
            if self._closed:
                return None
            batch = self._take(cursor, max_bytes)
            if batch is not None:
                return batch
        # ended: the tail may have arrived together with the end
        return self._take(cursor, max_bytes)

    async def _next_batch_coalesced(self, max_bytes: int) -> bytes | None:
        """next_batch() with the coalescing rule: a batch of fewer than coalesce_entries
        entries goes out at most once per coalesce_s (a hot stream waits for more, a cold
        one, whose previous batch left long enough ago, does not)."""
        hub = self._hub
        stream = hub._stream
        cursor = self._cursor
        loop = asyncio.get_running_loop()
        while True:
            pending = stream.next_seq - cursor.next_seq
            if pending:
                if pending < self._coalesce_entries and not hub._ended:
                    deadline = self._last_batch_at + self._coalesce_s
                    if deadline > loop.time():
                        self._coalesce_waits += 1
                        await self._coalesce(deadline)
                        if self._closed:
                            return None
                batch = self._take(cursor, max_bytes)
                if batch is not None:
                    self._last_batch_at = loop.time()
                    return batch
            if hub._ended:
                return self._take(cursor, max_bytes)
            await self._wait_for_data(None)
            if self._closed:
                return None

    async def _coalesce(self, deadline: float) -> None:
        """Wait until coalesce_entries are pending, the hub ends, or the deadline."""
        target = self._cursor.next_seq + self._coalesce_entries
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            await self._wait_for_data(remaining, target)

    async def _wait_for_data(self, timeout: float | None, target_seq: int = 0) -> None:
        """Until the hub has news (an entry; with target_seq, the stream reaching that seq;
        the end) or timeout seconds pass."""
        hub = self._hub
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if target_seq:
            hub._filling[self] = (fut, target_seq)
        else:
            hub._waiting[self] = fut
        self._waiting = True
        self._waits += 1
        timer = None if timeout is None else loop.call_later(timeout, _resolve, fut)
        try:
            await fut
        finally:
            self._waiting = False
            if timer is not None:
                timer.cancel()
            # cancelled or timed out: forget it here, the hub has not
            if hub._waiting.get(self) is fut:
                del hub._waiting[self]
            elif self in hub._filling and hub._filling[self][0] is fut:
                del hub._filling[self]

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> bytes:
        batch = await self.next_batch()
        if batch is None:
            raise StopAsyncIteration
        return batch

    def close(self) -> None:
        """Unsubscribe; a next_batch() waiting now returns None. Idempotent."""
        if self._closed:
            return
        self._closed = True
        hub = self._hub
        hub._watchers -= 1
        hub._stream.unsubscribe(self._cursor)
        hub._forget_held(self._cursor)
        fut = hub._waiting.pop(self, None)
        filling = hub._filling.pop(self, None)
        for f in (fut, filling[0] if filling else None):
            if f is not None and not f.done():
                f.set_result(None)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> WatcherStatistics:
        c = self._cursor.statistics()
        return WatcherStatistics(
            next_seq=c.next_seq, batches=c.batches, entries=c.entries, bytes=c.bytes,
            lost_entries=c.lost_entries, waits=self._waits,
            coalesce_waits=self._coalesce_waits, closed=self._closed)

    def __repr__(self) -> str:
        return f"<Watcher next_seq={self.next_seq}{' closed' if self._closed else ''}>"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --- writing: ControlWriter -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlStatistics:
    """A snapshot of one control writer's counters."""

    frames_sent: int  # frames written completely
    bytes_written: int  # bytes written to the pipe
    frames_queued: int  # frames (or their rest) waiting for the pipe to drain
    bytes_queued: int  # bytes waiting
    max_queued_bytes: int  # the bound on bytes_queued (one frame may pass it; see send_input)
    high_water: int  # the most bytes ever queued
    refused: int  # send_input() calls refused with ControlQueueFull
    merged: int  # interrupt/shutdown requests merged into one still queued
    closed: bool  # no more frames can be sent
    peer_closed: bool  # closed because the agent closed its end


class ControlWriter:
    """Non-blocking writer of control frames (INPUT, INTERRUPT, SHUTDOWN) to an agent.

    A frame is written at once when the pipe has room; what does not fit is queued and
    finished from `loop.add_writer`, in order. Takes ownership of `fd` (made non-blocking,
    closed by close()). It also watches for the agent closing its end of the pipe (the
    kernel reports EPOLLERR on our end), so `closed` turns True without waiting for a write.

    Args:
        fd: the write end of the control pipe.
        max_queued_bytes: bytes queued at most before send_input() refuses.
        loop: the running loop by default.
    """

    def __init__(self, fd: int, *, max_queued_bytes: int = DEFAULT_CONTROL_QUEUE_BYTES,
                 loop: asyncio.AbstractEventLoop | None = None, owns_fd: bool = True) -> None:
        if max_queued_bytes < 1:
            raise ValueError(f"max_queued_bytes must be at least 1, got {max_queued_bytes}")
        if loop is None:
            loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop = loop
        self._fd: int | None = fd
        self._owns_fd = owns_fd
        self._max = max_queued_bytes
        self._queue: deque[tuple[memoryview, int]] = deque()  # (unwritten rest, frame type)
        self._queued = 0
        self._writing = False  # add_writer is registered
        self._closed = False
        self._peer_closed = False
        self._reason = ""
        self._drained = asyncio.Event()
        self._drained.set()
        # INTERRUPT and SHUTDOWN frames queued and not yet fully written, by kind
        self._pending = dict.fromkeys(_MERGED_FRAMES, 0)
        # counters
        self._frames_sent = 0
        self._bytes_written = 0
        self._high_water = 0
        self._refused = 0
        self._merged = 0
        # epoll reports EPOLLERR on a pipe's write end once the read end is closed, and
        # asyncio's selector turns that into a "readable" callback: early EPIPE detection.
        loop.add_reader(fd, self._on_peer_event)

    closed = _read_only(
        "_closed", "No more frames can be sent: close() was called or the agent closed its end.")
    peer_closed = _read_only(
        "_peer_closed", "The agent closed its end of the control pipe (EPIPE).")

    def send_input(self, text: str) -> None:
        """Send an INPUT frame (steering text).

        Raises:
            InvalidSpec: the text is over protocol.MAX_CONTROL_PAYLOAD bytes of UTF-8.
            ControlQueueFull: frames are already queued and this one would pass the bound.
            ControlClosed: the pipe is closed.
        """
        payload = text.encode("utf-8")
        if len(payload) > protocol.MAX_CONTROL_PAYLOAD:
            raise InvalidSpec("input", f"is {len(payload)} bytes of UTF-8; the limit is "
                                       f"{protocol.MAX_CONTROL_PAYLOAD} bytes (1 MiB)")
        self._send(protocol.encode_frame(protocol.INPUT, payload), protocol.INPUT)

    def send_frame(self, kind: int, payload: bytes) -> None:
        """Send a protocol v1.1 task frame (TASK_ACCEPTED ... TASK_DONE), bounded like INPUT.

        Raises:
            ControlQueueFull: frames are already queued and this one would pass the bound.
            ControlClosed: the pipe is closed.
        """
        frame = protocol.encode_frame(kind, payload)
        if self._queue and self._queued + len(frame) > self._max:
            self._check_open()
            self._refused += 1
            raise ControlQueueFull(self._queued, self._max, len(frame))
        self._send(frame, kind)

    def send_interrupt(self) -> bool:
        """Send an INTERRUPT frame; False when one is still queued (the two are merged).

        Not subject to the queue bound: it is small and at most one waits at a time.

        Raises:
            ControlClosed: the pipe is closed.
        """
        return self._send_merged(protocol.INTERRUPT)

    def send_shutdown(self) -> bool:
        """Send a SHUTDOWN frame; False when one is still queued (the two are merged).

        Raises:
            ControlClosed: the pipe is closed.
        """
        return self._send_merged(protocol.SHUTDOWN)

    def _send_merged(self, kind: int) -> bool:
        """Send the payload-less frame `kind` unless one is still queued: an agent gains
        nothing from two interrupts (or shutdowns) in a row, so the second is counted as
        merged and False is returned."""
        if self._pending[kind]:
            self._check_open()
            self._merged += 1
            return False
        self._send(_MERGED_FRAMES[kind], kind)
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise ControlClosed(self._reason)

    def _send(self, frame: bytes, kind: int) -> None:
        self._check_open()
        if self._queue:
            if kind == protocol.INPUT and self._queued + len(frame) > self._max:
                self._refused += 1
                raise ControlQueueFull(self._queued, self._max, len(frame))
            self._enqueue(memoryview(frame), kind)
            return
        try:
            n = os.write(self._fd, frame)  # type: ignore[arg-type]
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._fail(exc)
            raise ControlClosed(self._reason) from None
        self._bytes_written += n
        if n == len(frame):
            self._frames_sent += 1
            return
        self._enqueue(memoryview(frame)[n:], kind)

    def _enqueue(self, rest: memoryview, kind: int) -> None:
        self._queue.append((rest, kind))
        self._queued += len(rest)
        if kind in self._pending:
            self._pending[kind] += 1
        if self._queued > self._high_water:
            self._high_water = self._queued
        if not self._writing:
            self._writing = True
            self._drained.clear()
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        queue = self._queue
        fd = self._fd
        if fd is None:  # shut earlier in this loop iteration (the peer-closed callback)
            return
        while queue:
            rest, kind = queue[0]
            try:
                n = os.write(fd, rest)  # type: ignore[arg-type]
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._bytes_written += n
            self._queued -= n
            if n < len(rest):
                queue[0] = (rest[n:], kind)
                return
            queue.popleft()
            self._frames_sent += 1
            if kind in self._pending:
                self._pending[kind] -= 1
        self._writing = False
        self._loop.remove_writer(fd)  # type: ignore[arg-type]
        self._drained.set()

    def _on_peer_event(self) -> None:
        # A pipe's write end is never readable, so this runs only on an error condition;
        # poll() confirms it (POLLERR: no reader left) before the writer gives up.
        if self._fd is None:
            return
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        for _, mask in poller.poll(0):
            if mask & select.POLLERR:
                self._fail(OSError(errno.EPIPE, os.strerror(errno.EPIPE)))

    def _fail(self, exc: OSError) -> None:
        if exc.errno == errno.EPIPE:
            self._peer_closed = True
            self._shut("the agent closed its control pipe (CORRAL_CONTROL_FD); "
                       "it can no longer receive input or interrupts")
        else:
            self._shut(f"writing to the agent's control pipe failed: {exc}")

    def _shut(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._reason = reason
        fd = self._fd
        self._fd = None
        if fd is not None:
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
            if self._owns_fd:
                os.close(fd)
        self._writing = False
        self._queue.clear()
        self._queued = 0
        self._pending = dict.fromkeys(_MERGED_FRAMES, 0)
        self._drained.set()

    def close(self) -> None:
        """Close our end now; queued frames are dropped. The agent reads EOF (= SHUTDOWN).

        Idempotent.
        """
        self._shut("the control pipe was closed by the runtime")

    async def drain(self) -> None:
        """Wait until every queued frame is written, or the writer is closed."""
        await self._drained.wait()

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(
            frames_sent=self._frames_sent,
            bytes_written=self._bytes_written,
            frames_queued=len(self._queue),
            bytes_queued=self._queued,
            max_queued_bytes=self._max,
            high_water=self._high_water,
            refused=self._refused,
            merged=self._merged,
            closed=self._closed,
            peer_closed=self._peer_closed,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd {self._fd}"
        return f"<ControlWriter {state} queued={self._queued}>"

