"""runtime/streams.py over real pipes and a real event loop, against both token cores.

Every stream test runs twice, once with the compiled core and once with its Python twin.
No pytest-asyncio: each test builds its coroutine and hands it to `run()`.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from corral.ext import agent as agent_helper
from corral.runtime.streams import (
    DEFAULT_READ_BUDGET,
    TWIN_READ_BUDGET,
    AgentPipes,
    ControlClosed,
    ControlQueueFull,
    ControlWriter,
    StreamHub,
    make_pipe_pair,
    pipe_capacity,
)
from corral.sandbox.errors import CorralError, InvalidSpec

from .test_stream_core import IMPLS, batch_entries, load_impl

TOKEN, TURN_END, PROGRESS, LOG, ERROR = 1, 2, 3, 6, 64
BAD_UTF8, TRUNCATED_FRAME = 3, 5


@pytest.fixture(params=IMPLS)
def core(request):
    """The token core module under test (compiled, or the pure-Python twin)."""
    return load_impl(request.param)


@pytest.fixture(autouse=True)
def no_fd_left_open():
    """Every test closes every descriptor it (or the code under test) opened."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    left = set(os.listdir("/proc/self/fd")) - before
    details = {fd: _fd_target(fd) for fd in left}
    assert not {fd: t for fd, t in details.items() if t is not None}, f"fds left open: {details}"


def _fd_target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # the listing's own descriptor, gone by now


def run(coro, timeout: float = 60.0):
    """Run a test coroutine on a fresh event loop, failing it after `timeout` seconds."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def frame(kind: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(4, "little") + bytes([kind]) + payload


def token_texts(n: int, seed: int = 7) -> list[bytes]:
    """n token texts, some empty, some multi-byte UTF-8."""
    rng = random.Random(seed)
    words = ["a", "bc", "def", " ", "", "é", "日本", "🙂", "tok", "\n"]
    return [f"{rng.choice(words)}{i % 97}".encode() for i in range(n)]


class Writer(threading.Thread):
    """Writes `data` to a blocking fd in the given chunk sizes (cycled), then closes it."""

    def __init__(self, fd: int, data: bytes, chunks: list[int], close: bool = True) -> None:
        super().__init__(daemon=True)
        self.fd, self.data, self.chunks, self.close_fd = fd, data, chunks, close

    def run(self) -> None:
        view = memoryview(self.data)
        pos = 0
        i = 0
        while pos < len(view):
            size = self.chunks[i % len(self.chunks)]
            i += 1
            piece = view[pos:pos + size]
            while piece:
                n = os.write(self.fd, piece)
                piece = piece[n:]
            pos += size
        if self.close_fd:
            os.close(self.fd)


async def collect(watcher, max_bytes: int = 64 << 10) -> tuple[list[tuple], list]:
    """Every entry a watcher returns until None, and the DataLost notices it saw."""
    entries: list[tuple] = []
    lost = []
    async for raw in watcher:
        got, batch = batch_entries(raw)
        if batch.HasField("lost"):
            lost.append((batch.lost.first_lost_seq, batch.lost.count))
        entries.extend(got)
    return entries, lost


def seqs_contiguous(entries: list[tuple], first: int = 1) -> bool:
    return [e[0] for e in entries] == list(range(first, first + len(entries)))


# --- reading -----------------------------------------------------------------------------


SPLITS = {
    "whole": [1 << 30],
    "bytes": [1],
    "random": [random.Random(3).randint(1, 40) for _ in range(257)],
    "odd-large": [65537, 3, 131071],
}


@pytest.mark.parametrize("watchers", [1, 4])
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_tokens_in_any_split_arrive_in_order_once(core, split, watchers):
    n = 3000 if split == "bytes" else 20000
    texts = token_texts(n)
    data = b"".join(frame(TOKEN, t) for t in texts)

    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        subs = [hub.watch() for _ in range(watchers)]
        writer = Writer(w, data, SPLITS[split])
        writer.start()
        results = await asyncio.gather(*(collect(s) for s in subs))
        writer.join()
        return hub, results

    hub, results = run(main())
    for entries, lost in results:
        assert lost == []
        assert seqs_contiguous(entries)
        assert [e[2] for e in entries] == texts
        assert {e[1] for e in entries} == {TOKEN}
    stats = hub.statistics()
    assert stats.eof and stats.ended and stats.fd is None
    assert stats.bytes_read == len(data)
    assert stats.entries_appended == n


def test_a_watcher_that_never_reads_stalls_nobody_and_is_told_what_it_lost(core):
    n = 50000
    texts = token_texts(n)
    data = b"".join(frame(TOKEN, t) for t in texts)

    async def main():
        r, w = make_pipe_pair()
        # one read (16 KiB of 9-ish-byte frames) costs well under the 64 KiB log, so the fast
        # watcher, which runs between two reads, can never be overtaken
        hub = StreamHub(core.TokenStream("frames", log_bytes=64 << 10), read_budget=16 << 10)
        hub.attach_fd(r)
        slow = hub.watch()
        fast = [hub.watch() for _ in range(2)]
        writer = Writer(w, data, [4096])
        writer.start()
        fast_results = await asyncio.gather(*(collect(f) for f in fast))
        await hub.wait_eof()
        # the producer finished while `slow` had not read a single batch
        await asyncio.get_running_loop().run_in_executor(None, writer.join, 10)
        assert not writer.is_alive()
        slow_result = await collect(slow)
        return hub, fast_results, slow_result, slow

    hub, fast_results, (slow_entries, slow_lost), slow = run(main())
    for entries, lost in fast_results:
        assert lost == [] and seqs_contiguous(entries) and [e[2] for e in entries] == texts
    first_kept = hub.stream.first_seq
    assert first_kept > 1
    assert slow_lost == [(1, first_kept - 1)]
    assert slow.lost_entries == first_kept - 1
    assert seqs_contiguous(slow_entries, first_kept)
    assert [e[2] for e in slow_entries] == texts[first_kept - 1:]


def test_eof_ends_every_watcher_after_the_tail(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        watcher = hub.watch()
        os.write(w, frame(TOKEN, b"last") + frame(TOKEN, b"one"))
        first = await watcher.next_batch()
        os.write(w, frame(TOKEN, b"tail"))
        os.close(w)
        await hub.wait_eof()
        tail = await watcher.next_batch()
        end = await watcher.next_batch()
        again = await watcher.next_batch()
        late = hub.watch()  # a watcher made after the end still replays the log
        late_entries, _ = await collect(late)
        return hub, first, tail, end, again, late_entries

    hub, first, tail, end, again, late_entries = run(main())
    assert [e[2] for e in batch_entries(first)[0]] == [b"last", b"one"]
    assert [e[2] for e in batch_entries(tail)[0]] == [b"tail"]
    assert end is None and again is None
    assert [e[2] for e in late_entries] == [b"last", b"one", b"tail"]
    assert hub.eof and hub.ended and hub.error is None


def test_events_reach_on_event_in_order_before_watchers(core):
    seen: list = []
    data = b"".join([
        frame(TOKEN, b"Hel"), frame(TOKEN, b"lo"),
        frame(PROGRESS, b'{"done":1,"total":2}'),
        frame(TOKEN, b"\xff"),  # not UTF-8: an ERROR entry, and the frame is skipped
        frame(LOG, b"thinking"),
        frame(TURN_END, b'{"status":"completed"}'),
        frame(TOKEN, b"!"),
        frame(TOKEN, b"cut")[:6],  # the stream ends inside this frame
    ])

    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"), on_event=seen.append)
        hub.attach_fd(r)
        watcher = hub.watch()
        Writer(w, data, [3]).start()
        entries = []
        async for raw in watcher:
            got, _ = batch_entries(raw)
            # events are dispatched before the batch holding them can be taken
            assert {e.seq for e in seen} >= {e[0] for e in got if e[1] != TOKEN}
            entries.extend(got)
        return entries

    entries = run(main())
    assert [(e.seq, int(e.kind)) for e in seen] == [
        (3, PROGRESS), (4, ERROR), (5, LOG), (6, TURN_END), (8, ERROR)]
    assert seen[0].payload == b'{"done":1,"total":2}'
    assert seen[3].payload == b'{"status":"completed"}'
    assert int(seen[1].error) == BAD_UTF8 and int(seen[4].error) == TRUNCATED_FRAME
    assert [(e[0], e[1]) for e in entries] == [
        (1, TOKEN), (2, TOKEN), (3, PROGRESS), (4, ERROR), (5, LOG), (6, TURN_END), (7, TOKEN),
        (8, ERROR)]


def test_a_failing_on_event_is_reported_and_reading_goes_on(core):
    reported = []

    def boom(event):
        raise RuntimeError("daemon bug")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"), on_event=boom)
        hub.attach_fd(r)
        os.write(w, frame(LOG, b"one") + frame(TOKEN, b"two"))
        os.close(w)
        entries, _ = await collect(hub.watch())
        return hub, entries

    hub, entries = run(main())
    assert [e[2] for e in entries] == [b"one", b"two"]
    assert hub.statistics().on_event_failures == 1
    assert reported[0]["message"] == "StreamHub on_event callback failed on seq 1"
    assert isinstance(reported[0]["exception"], RuntimeError)


def test_append_event_wakes_a_waiting_watcher(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        watcher = hub.watch()
        waiting = asyncio.ensure_future(watcher.next_batch())
        await asyncio.sleep(0.01)
        assert not waiting.done() and hub.statistics().waiting == 1
        seq = hub.append_event(TURN_END, b'{"status":"interrupted"}')
        raw = await waiting
        os.close(w)
        await hub.wait_eof()
        with pytest.raises(RuntimeError, match=r"^append_event\(\) after the hub ended"):
            hub.append_event(TURN_END, b'{"status":"failed"}')
        return seq, raw

    seq, raw = run(main())
    assert seq == 1
    assert batch_entries(raw)[0] == [(1, TURN_END, b'{"status":"interrupted"}', 0, "")]


def test_notify_callbacks_let_a_poller_drain_many_hubs_without_waiting(core):
    """add_notify + take_ready: what OpenMany uses instead of one future per watcher."""
    async def main():
        hubs, writers, watchers, notified = [], [], [], []
        for i in range(3):
            r, w = make_pipe_pair()
            hub = StreamHub(core.TokenStream("frames"))
            hub.attach_fd(r)
            hub.add_notify(lambda i=i: notified.append(i))
            hubs.append(hub)
            writers.append(w)
            watchers.append(hub.watch())
        assert [wt.take_ready() for wt in watchers] == [None, None, None]
        assert not any(wt.finished for wt in watchers)
        os.write(writers[1], frame(TOKEN, b"one") + frame(TOKEN, b"two"))
        while not notified:
            await asyncio.sleep(0.001)
        assert notified == [1]
        got, _ = batch_entries(watchers[1].take_ready())
        assert [e[2] for e in got] == [b"one", b"two"]
        assert watchers[1].take_ready() is None and not watchers[1].finished
        # a failing callback is reported to the loop; the others still run, reading goes on
        reported = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: reported.append(ctx))
        hubs[0].add_notify(lambda: 1 / 0)
        hubs[0].append_event(PROGRESS, b"{}")
        assert notified[-1] == 0 and "notify callback failed" in reported[0]["message"]
        assert batch_entries(watchers[0].take_ready())[0][0][1] == PROGRESS
        for w in writers:
            os.close(w)
        for hub in hubs:
            await hub.wait_eof()
        assert all(wt.finished for wt in watchers)  # ended and read to the end
        count = len(notified)
        hubs[2].remove_notify(hubs[2]._notify[0])
        hubs[2].remove_notify(print)  # not there: no error
        for wt in watchers:
            wt.close()
        return count

    assert run(main()) >= 5  # 1 read + 1 event + 3 ends


def test_end_on_eof_false_lets_the_runtime_add_final_events(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"), end_on_eof=False)
        hub.attach_fd(r)
        watcher = hub.watch()
        os.write(w, frame(TOKEN, b"partial answer"))
        os.close(w)
        await hub.wait_eof()
        assert hub.eof and not hub.ended
        first = await watcher.next_batch()
        pending = asyncio.ensure_future(watcher.next_batch())
        await asyncio.sleep(0.01)
        assert not pending.done()  # input ended, but the hub has not
        hub.append_event(TURN_END, b'{"status":"interrupted"}')
        second = await pending
        hub.close()
        end = await watcher.next_batch()
        return first, second, end

    first, second, end = run(main())
    assert [e[2] for e in batch_entries(first)[0]] == [b"partial answer"]
    assert [e[:2] for e in batch_entries(second)[0]] == [(2, TURN_END)]
    assert end is None


def test_watch_after_seq_resumes_right_after_it(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        os.write(w, b"".join(frame(TOKEN, b"%d" % i) for i in range(1, 11)))
        os.close(w)
        await hub.wait_eof()
        resumed, _ = await collect(hub.watch(after_seq=7))
        everything, _ = await collect(hub.watch(after_seq=0))
        caught_up = await hub.watch(after_seq=10).next_batch()
        with pytest.raises(InvalidSpec, match=r"^after_seq: 11 is past the newest entry of "
                                              r"the stream \(seq 10\); resume from 0 to 10$"):
            hub.watch(after_seq=11)
        return resumed, everything, caught_up

    resumed, everything, caught_up = run(main())
    assert [(e[0], e[2]) for e in resumed] == [(8, b"8"), (9, b"9"), (10, b"10")]
    assert len(everything) == 10 and caught_up is None


def test_closing_a_watcher_ends_its_wait_and_cancelling_leaves_nothing_behind(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        watcher = hub.watch()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(watcher.next_batch(), 0.01)
        assert hub.statistics().waiting == 0
        pending = asyncio.ensure_future(watcher.next_batch())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match=r"^another next_batch\(\) of this watcher is "
                                               r"already waiting$"):
            await watcher.next_batch()
        watcher.close()
        result = await pending
        after = await watcher.next_batch()
        stats = hub.statistics()
        hub.close()
        os.close(w)
        return result, after, stats

    result, after, stats = run(main())
    assert result is None and after is None
    assert stats.watchers == 0 and stats.waiting == 0 and stats.stream.subscribers == 0


def test_close_detaches_and_ends_watchers_after_the_tail(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        watcher = hub.watch()
        os.write(w, frame(TOKEN, b"kept") + frame(TOKEN, b"cut")[:7])
        while hub.stream.next_seq == 1:
            await asyncio.sleep(0.001)
        hub.close()
        hub.close()  # idempotent
        entries, _ = await collect(watcher)
        fd_closed = _fd_is_closed(r)
        os.close(w)
        return hub, entries, fd_closed

    hub, entries, fd_closed = run(main())
    assert [(e[1], e[2]) for e in entries] == [(TOKEN, b"kept"), (ERROR, b"")]
    assert entries[1][3] == TRUNCATED_FRAME
    assert fd_closed and hub.statistics().fd is None and hub.ended


def _fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_a_read_error_ends_input_like_eof_and_is_recorded(core):
    async def main():
        master, slave = os.openpty()
        os.set_blocking(slave, True)
        hub = StreamHub(core.TokenStream("text"))
        hub.attach_fd(master)
        watcher = hub.watch()
        os.write(slave, "héllo\n".encode())
        os.close(slave)  # reading a pty master whose other side is gone fails with EIO
        entries, _ = await collect(watcher)
        return hub, entries

    hub, entries = run(main())
    assert b"".join(e[2] for e in entries) == "héllo\r\n".encode()
    assert hub.eof and hub.ended
    assert hub.error is not None and hub.error.errno == errno.EIO
    assert hub.statistics().error == "[Errno 5] Input/output error"


def test_attach_fd_twice_is_refused(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        with pytest.raises(RuntimeError, match=rf"^StreamHub already reads fd {r}; one fd per "
                                               r"stream$"):
            hub.attach_fd(w)
        hub.close()
        os.close(w)
        with pytest.raises(RuntimeError, match=r"^StreamHub input has ended"):
            hub.attach_fd(0)

    run(main())


def test_coalescing_holds_back_only_a_hot_streams_tiny_batches(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        watcher = hub.watch(coalesce_s=30.0, coalesce_entries=2)

        async def wait_coalescing(count: int) -> None:
            while watcher.statistics().coalesce_waits < count:
                await asyncio.sleep(0.001)

        os.write(w, frame(TOKEN, b"a"))
        cold = await watcher.next_batch()  # no batch went out before: not held back
        pending = asyncio.ensure_future(watcher.next_batch())
        os.write(w, frame(TOKEN, b"b"))
        await wait_coalescing(1)  # hot: "b" alone is too small to go out yet
        os.write(w, frame(TOKEN, b"c"))  # coalesce_entries reached: out at once
        filled = await pending
        pending = asyncio.ensure_future(watcher.next_batch())
        os.write(w, frame(TOKEN, b"d"))
        await wait_coalescing(2)
        hub.close()  # the end cuts the wait short: the tail goes out now
        tail = await pending
        end = await watcher.next_batch()
        os.close(w)

        r, w = make_pipe_pair()  # a short coalesce_s: the held batch leaves at its deadline
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        quick = hub.watch(coalesce_s=0.02, coalesce_entries=100)
        os.write(w, frame(TOKEN, b"e"))
        first = await quick.next_batch()
        os.write(w, frame(TOKEN, b"f"))
        late = await quick.next_batch()
        os.close(w)
        return cold, filled, tail, end, watcher.statistics(), first, late, quick.statistics()

    cold, filled, tail, end, stats, first, late, quick = run(main(), timeout=10)
    assert [e[2] for e in batch_entries(cold)[0]] == [b"a"]
    assert [e[2] for e in batch_entries(filled)[0]] == [b"b", b"c"]
    assert [e[2] for e in batch_entries(tail)[0]] == [b"d"]
    assert end is None and stats.coalesce_waits == 2
    assert [e[2] for e in batch_entries(first)[0]] == [b"e"]
    assert [e[2] for e in batch_entries(late)[0]] == [b"f"]
    assert quick.coalesce_waits == 1


def test_the_loop_keeps_ticking_through_a_million_token_burst(core, record_property):
    """Reads are bounded per readable event; max loop lag is reported, not asserted."""
    tokens = 1_000_000
    producer = textwrap.dedent(f"""
        import os, sys
        frame = (4).to_bytes(4, "little") + b"\\x01" + b"tok "
        data = frame * {tokens}
        fd = int(sys.argv[1])
        view = memoryview(data)
        for pos in range(0, len(view), 65536):
            os.write(fd, view[pos:pos + 65536])
    """)

    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        watcher = hub.watch()
        lag = 0.0
        ticks = 0
        stop = False

        async def ticker():
            nonlocal lag, ticks
            while not stop:
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                lag = max(lag, time.perf_counter() - before - 0.001)
                ticks += 1

        tick_task = asyncio.ensure_future(ticker())
        proc = subprocess.Popen([sys.executable, "-c", producer, str(w)], pass_fds=(w,))
        os.close(w)
        start = time.perf_counter()
        entries = 0
        while (raw := await watcher.next_batch()) is not None:
            entries += _count_tokens(raw)
        elapsed = time.perf_counter() - start
        stop = True
        await tick_task
        proc.wait(10)
        return hub, entries, lag, ticks, elapsed, proc.returncode

    hub, entries, lag, ticks, elapsed, rc = run(main(), timeout=240)
    assert rc == 0
    assert entries == tokens
    stats = hub.statistics()
    budget = TWIN_READ_BUDGET if core.IMPLEMENTATION == "python" else DEFAULT_READ_BUDGET
    assert stats.max_bytes_per_event <= budget
    record_property("max_loop_lag_ms", round(lag * 1e3, 2))
    record_property("tokens_per_s", round(tokens / elapsed))
    print(f"\n[{core.IMPLEMENTATION}] 1M tokens in {elapsed:.2f}s "
          f"({tokens / elapsed:,.0f}/s), max loop lag {lag * 1e3:.2f} ms over {ticks} ticks, "
          f"{stats.readable_events} readable events, "
          f"max {stats.max_bytes_per_event} B per event")


def _count_tokens(raw: bytes) -> int:
    from corral.v1 import stream_pb2
    return len(stream_pb2.StreamBatch.FromString(raw).lengths)


# --- writing -----------------------------------------------------------------------------


class ControlPipe:
    """A control pipe with the agent helper reading its end."""

    def __init__(self, size: int | None = None) -> None:
        self.r, self.w = make_pipe_pair(size=size)
        self.agent = agent_helper.Agent(None, self.r, env={})
        self.r_open = True

    def close_reader(self) -> None:
        if self.r_open:
            self.r_open = False
            os.close(self.r)

    async def read(self, count: int, timeout: float = 10.0) -> list:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            message = self.agent.poll()
            if message is None:
                assert time.monotonic() < deadline, f"only {len(got)} of {count} arrived"
                await asyncio.sleep(0.001)
            else:
                got.append(message)
        return got


def test_control_frames_reach_the_agent_helper():
    async def main():
        pipe = ControlPipe()
        writer = ControlWriter(pipe.w)
        writer.send_input("héllo, steer left")
        assert writer.send_interrupt() is True
        assert writer.send_shutdown() is True
        messages = await pipe.read(3)
        writer.close()
        eof = await pipe.read(1)
        pipe.close_reader()
        return messages, eof, writer.statistics()

    messages, eof, stats = run(main())
    assert messages == [agent_helper.Control("input", "héllo, steer left"),
                        agent_helper.Control("interrupt"), agent_helper.Control("shutdown")]
    assert eof == [agent_helper.Control("shutdown")]  # EOF on the control pipe reads so
    assert stats.frames_sent == 3 and stats.bytes_queued == 0 and stats.closed


def test_a_full_pipe_queues_without_blocking_then_drains_in_order():
    async def main():
        pipe = ControlPipe(size=4096)
        assert pipe_capacity(pipe.w) == 4096
        writer = ControlWriter(pipe.w)
        texts = [f"{i:04d}" + "x" * 1000 for i in range(40)]
        for text in texts:  # 40 KB into a 4 KiB pipe: would block a blocking writer
            writer.send_input(text)
        queued = writer.statistics()
        messages = await pipe.read(40)
        await asyncio.wait_for(writer.drain(), 5)
        drained = writer.statistics()
        writer.close()
        pipe.close_reader()
        return texts, queued, messages, drained

    texts, queued, messages, drained = run(main())
    assert queued.bytes_queued > 0 and queued.frames_queued > 0
    assert [m.text for m in messages] == texts
    assert drained.bytes_queued == 0 and drained.frames_sent == 40


def test_the_queue_is_bounded_and_interrupts_are_merged_not_refused():
    async def main():
        pipe = ControlPipe(size=4096)
        writer = ControlWriter(pipe.w)
        text = "y" * 1019  # a 1024-byte frame
        sent = 0
        with pytest.raises(ControlQueueFull) as caught:
            while True:
                writer.send_input(text)
                sent += 1
        full = writer.statistics()
        first = writer.send_interrupt()
        second = writer.send_interrupt()
        messages = await pipe.read(sent + 1, timeout=30)
        await writer.drain()
        third = writer.send_interrupt()  # nothing queued any more: a new one goes out
        last = await pipe.read(1)
        writer.close()
        pipe.close_reader()
        return caught.value, full, first, second, third, messages, last, sent

    exc, full, first, second, third, messages, last, sent = run(main())
    assert isinstance(exc, CorralError) and exc.grpc_status == "RESOURCE_EXHAUSTED"
    assert str(exc) == (
        f"the agent is not reading its control pipe: {full.bytes_queued} bytes of control "
        f"frames are already queued (limit {4 << 20}); refused a frame of 1024 bytes")
    assert full.bytes_queued <= 4 << 20 and full.refused == 1
    assert (first, second, third) == (True, False, True)
    assert [m.kind for m in messages] == ["input"] * sent + ["interrupt"]
    assert last == [agent_helper.Control("interrupt")]


def test_the_agent_closing_its_end_is_noticed_without_a_write():
    async def main():
        pipe = ControlPipe()
        writer = ControlWriter(pipe.w)
        pipe.close_reader()
        deadline = time.monotonic() + 5
        while not writer.closed:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        with pytest.raises(ControlClosed) as caught:
            writer.send_input("anyone there?")
        with pytest.raises(ControlClosed):
            writer.send_interrupt()
        return writer, caught.value

    writer, exc = run(main())
    assert writer.peer_closed
    assert exc.grpc_status == "FAILED_PRECONDITION"
    assert str(exc) == ("the agent closed its control pipe (CORRAL_CONTROL_FD); it can no "
                        "longer receive input or interrupts")


def test_queued_frames_are_dropped_when_the_agent_goes_away():
    async def main():
        pipe = ControlPipe(size=4096)
        writer = ControlWriter(pipe.w)
        for _ in range(10):
            writer.send_input("z" * 1000)
        assert writer.statistics().bytes_queued > 0
        pipe.close_reader()
        await asyncio.wait_for(writer.drain(), 5)
        return writer.statistics()

    stats = run(main())
    assert stats.closed and stats.peer_closed and stats.bytes_queued == 0


def test_sending_after_close_and_oversize_input_are_refused():
    async def main():
        pipe = ControlPipe()
        writer = ControlWriter(pipe.w)
        with pytest.raises(InvalidSpec, match=r"^input: is 1048577 bytes of UTF-8; the limit "
                                              r"is 1048576 bytes \(1 MiB\)$"):
            writer.send_input("x" * ((1 << 20) + 1))
        writer.close()
        closed_fd = _fd_is_closed(pipe.w)
        with pytest.raises(ControlClosed, match=r"^the control pipe was closed by the "
                                                r"runtime$"):
            writer.send_shutdown()
        pipe.close_reader()
        return closed_fd

    assert run(main())


# --- pipes and a whole agent ------------------------------------------------------------


def test_agent_pipes_are_cloexec_and_map_to_fds_3_and_4():
    pipes = AgentPipes.open()
    try:
        for fd in (pipes.events_r, pipes.events_w, pipes.control_r, pipes.control_w):
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert os.get_blocking(fd)
        assert pipes.pass_fds() == {3: pipes.events_w, 4: pipes.control_r}
        assert pipes.env() == {"CORRAL_PROTOCOL": "1", "CORRAL_EVENTS_FD": "3",
                               "CORRAL_CONTROL_FD": "4"}
        with open("/proc/sys/fs/pipe-max-size") as f:
            if int(f.read()) >= 1 << 20:
                assert pipe_capacity(pipes.events_r) == 1 << 20
        pipes.close_agent_ends()
        assert pipes.events_w is None and pipes.control_r is None
        with pytest.raises(ValueError, match=r"^the agent's pipe ends were already closed$"):
            pipes.pass_fds()
    finally:
        pipes.close()


AGENT = """
import os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import agent as corral_agent
a = corral_agent.Agent()
msg = a.wait(10)
assert msg.kind == "input", msg
for i in range(100000):
    a.token(f"{msg.text}{i} ")
    got = a.poll()
    if got is not None and got.kind == "interrupt":
        a.turn_end("interrupted", tokens=i + 1)
        break
else:
    a.turn_end("completed")
assert a.wait(10).kind == "shutdown"
"""


def test_a_real_agent_is_steered_and_interrupted(core):
    turn_ends = []

    async def main():
        pipes = AgentPipes.open()
        env = dict(os.environ, CORRAL_EVENTS_FD=str(pipes.events_w),
                   CORRAL_CONTROL_FD=str(pipes.control_r))
        proc = subprocess.Popen([sys.executable, "-c", AGENT, agent_helper.__file__], env=env,
                                pass_fds=tuple(pipes.pass_fds().values()))
        pipes.close_agent_ends()
        hub = StreamHub(core.TokenStream("frames"), on_event=turn_ends.append)
        hub.attach_fd(pipes.events_r)
        control = ControlWriter(pipes.control_w)
        watcher = hub.watch()
        control.send_input("t")
        tokens = 0
        while tokens < 50:
            entries, _ = batch_entries(await watcher.next_batch())
            tokens += len(entries)
        control.send_interrupt()
        while not turn_ends:
            assert await watcher.next_batch() is not None
        control.send_shutdown()
        rest, _ = await collect(watcher)
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        control.close()
        return hub, code

    hub, code = run(main())
    assert code == 0
    assert len(turn_ends) == 1 and int(turn_ends[0].kind) == TURN_END
    status = json.loads(turn_ends[0].payload)
    assert status["status"] == "interrupted" and status["tokens"] >= 50
    assert hub.eof and hub.error is None
