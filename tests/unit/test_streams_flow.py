"""Flow control of lossless hubs (runtime/streams.py rule 6) over real pipes, both cores:
a slow or absent reader blocks the writer, nothing is lost, every byte arrives as written."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import pytest

from corral.runtime.streams import StreamHub, make_pipe_pair
from corral.v1 import stream_pb2

from .test_stream_core import IMPLS, load_impl
from .test_streams import no_fd_left_open, run  # noqa: F401 - the fixture applies here too

LOG = 1 << 20  # a small replay log, so the program is held back many times


@pytest.fixture(params=IMPLS)
def core(request):
    return load_impl(request.param)


class Writer(threading.Thread):
    """Writes `total` pseudo-random bytes into a blocking pipe, then closes it."""

    def __init__(self, fd: int, total: int, chunk: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.fd, self.total, self.chunk = fd, total, chunk
        self.digest = hashlib.sha256()
        self.written = 0
        self.broken = False  # the reading end was closed under it (EPIPE)
        self.done = threading.Event()

    def run(self) -> None:
        seed = hashlib.sha256(b"seed").digest()
        try:
            while self.written < self.total:
                seed = hashlib.sha256(seed).digest()
                data = (seed * (self.chunk // 32 + 1))[:min(self.chunk, self.total - self.written)]
                self.digest.update(data)
                view = memoryview(data)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                self.written += len(data)
        except BrokenPipeError:
            self.broken = True
        finally:
            os.close(self.fd)
            self.done.set()


async def read_all(watcher, delay: float = 0.0) -> tuple[bytes, int]:
    digest, lost, size = hashlib.sha256(), 0, 0
    async for raw in watcher:
        batch = stream_pb2.StreamBatch.FromString(raw)
        lost += batch.lost.count
        digest.update(batch.text)
        size += len(batch.text)
        if delay:
            await asyncio.sleep(delay)
    return digest.digest(), lost


def test_a_slow_reader_gets_every_byte_and_the_writer_waits(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True)
        hub.attach_fd(r)
        writer = Writer(w, 8 * LOG)
        writer.start()
        digest, lost = await read_all(hub.watch(), delay=0.002)
        writer.join()
        return hub, writer, digest, lost

    hub, writer, digest, lost = run(main())
    assert (digest, lost) == (writer.digest.digest(), 0)
    stats = hub.statistics()
    assert stats.pauses > 0 and stats.stream.evicted_entries > 0  # held back, not dropped
    assert stats.bytes_read == 8 * LOG


def test_with_no_reader_the_hub_stops_and_a_late_one_gets_everything(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True)
        hub.attach_fd(r)
        writer = Writer(w, 4 * LOG)
        writer.start()
        while not hub.paused:
            await asyncio.sleep(0.01)
        held = hub.statistics()
        assert not writer.done.is_set()  # the writer is blocked on a full pipe
        digest, lost = await read_all(hub.watch(after_seq=0))
        writer.join()
        return held, writer, digest, lost

    held, writer, digest, lost = run(main())
    assert (digest, lost) == (writer.digest.digest(), 0)
    assert held.stream.evicted_entries == 0
    assert held.stream.log_bytes <= LOG // 4


def test_a_reader_that_drops_and_resumes_after_its_last_seq_loses_nothing(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True)
        hub.attach_fd(r)
        writer = Writer(w, 8 * LOG)
        writer.start()
        digest, last, rounds = hashlib.sha256(), None, 0
        while True:
            watcher = hub.watch(last)
            ended = True
            for _ in range(7):  # a few batches, then drop the stream
                raw = await watcher.next_batch(32 << 10)
                if raw is None:
                    break
                batch = stream_pb2.StreamBatch.FromString(raw)
                assert not batch.HasField("lost")
                digest.update(batch.text)
                last = batch.first_seq + len(batch.lengths) - 1
            else:
                ended = False
            watcher.close()
            rounds += 1
            await asyncio.sleep(0.005)  # the writer runs on while no one watches
            if ended:
                break
        writer.join()
        return writer, digest.digest(), rounds

    writer, digest, rounds = run(main())
    assert digest == writer.digest.digest()
    assert rounds > 10


def test_a_lossy_watcher_does_not_hold_the_program_back(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True)
        hub.attach_fd(r)
        lossy = hub.watch(lossy=True)
        holder = hub.watch()
        writer = Writer(w, 4 * LOG)
        writer.start()
        holder_digest, holder_lost = await read_all(holder)  # reads at full speed
        lossy_digest, lossy_lost = await read_all(lossy)  # reads only at the end
        writer.join()
        return writer, holder_digest, holder_lost, lossy_lost

    writer, holder_digest, holder_lost, lossy_lost = run(main())
    assert (holder_digest, holder_lost) == (writer.digest.digest(), 0)
    assert lossy_lost > 0


def test_lossless_needs_a_bytes_stream(core):
    with pytest.raises(ValueError, match=r"^a lossless hub needs a bytes-mode stream, not 'text'$"):
        StreamHub(core.TokenStream("text"), lossless=True)


def test_a_paused_hub_closes_its_fd_and_release_reads_to_the_end(core):
    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True)
        hub.attach_fd(r)
        writer = Writer(w, 4 * LOG)
        writer.start()
        while not hub.paused:
            await asyncio.sleep(0.01)
        hub.release_flow_control()  # the sandbox is going away: read on, evicting
        await hub.wait_eof()
        writer.join()
        released = hub.statistics()

        r2, w2 = make_pipe_pair()
        other = StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True)
        other.attach_fd(r2)
        second = Writer(w2, 4 * LOG)
        second.start()
        while not other.paused:
            await asyncio.sleep(0.01)
        other.close()  # paused: its fd is registered nowhere, and is closed all the same
        second.join()  # the blocked writer gets EPIPE: nothing reads that pipe any more
        return released, other.statistics(), second.broken

    released, closed, broken = run(main())
    assert (released.bytes_read, released.paused, released.lossless) == (4 * LOG, False, False)
    assert (closed.fd, closed.paused, closed.ended, broken) == (None, False, True, True)


def test_hold_bytes_must_fit_in_the_log_and_needs_a_lossless_hub(core):
    for hold in (0, LOG, LOG + 1):
        with pytest.raises(ValueError, match=rf"^hold_bytes must be more than 0 and less than "
                                             rf"the log's {LOG} bytes, got {hold}$"):
            StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True, hold_bytes=hold)
    with pytest.raises(ValueError, match=r"^hold_bytes is for lossless hubs$"):
        StreamHub(core.TokenStream("bytes", log_bytes=LOG), hold_bytes=LOG // 2)


def test_what_a_dropped_reader_had_in_flight_is_replayed_from_the_log_past_the_hold(core):
    # A client's gRPC stream holds batches the daemon took but the client never saw (its
    # HTTP/2 window). With hold_bytes small, the rest of the log keeps that much of the
    # output already taken, and the resume from the last batch the client saw loses nothing.
    in_flight_bytes = 600 << 10
    hold = 64 << 10

    async def main():
        r, w = make_pipe_pair()
        hub = StreamHub(core.TokenStream("bytes", log_bytes=LOG), lossless=True,
                        hold_bytes=hold)
        hub.attach_fd(r)
        writer = Writer(w, 8 * LOG)
        writer.start()
        digest, last, rounds, most_held = hashlib.sha256(), None, 0, 0
        while True:
            watcher = hub.watch(last)
            flight: list = []  # taken from the hub, not yet seen by the "client"
            ended = True
            for _ in range(100):
                raw = await watcher.next_batch(16 << 10)
                if raw is None:
                    break
                batch = stream_pb2.StreamBatch.FromString(raw)
                assert not batch.HasField("lost")
                flight.append(batch)
                while sum(len(b.text) for b in flight) > in_flight_bytes:
                    seen = flight.pop(0)
                    digest.update(seen.text)
                    last = seen.first_seq + len(seen.lengths) - 1
                if hub.paused:
                    most_held = max(most_held, hub.statistics().stream.log_bytes)
            else:
                ended = False
            if ended:  # the stream's end reached the client: so did the batches before it
                for seen in flight:
                    digest.update(seen.text)
            watcher.close()  # the batches in flight are lost with the stream
            rounds += 1
            await asyncio.sleep(0.002)
            if ended:
                break
        writer.join()
        return writer, digest.digest(), rounds, hub.statistics()

    writer, digest, rounds, stats = run(main())
    assert digest == writer.digest.digest()
    assert rounds >= 3
    assert stats.pauses > 0 and stats.stream.evicted_entries > 0
