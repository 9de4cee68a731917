"""ext/_reactor.pyx: one epoll set for many agent fds, drained in C.

Real pipes and ptys; each test checks what the owners were told, in what order, how many
reads were made, and that no descriptor is left behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pty

import pytest

from corral.ext._reactor import Reactor
from corral.runtime.streams import StreamHub

from .test_stream_core import load_impl


class Owner:
    """Records every _reactor_read call; optionally runs a hook in it."""

    def __init__(self, name: str, log: list, hook=None):
        self.name, self.log, self.hook = name, log, hook
        self.fed = bytearray()

    def feed(self, view) -> int:
        self.fed += view
        return len(view)  # "entries appended": one per byte, for the test

    def _reactor_read(self, n: int, appended: int) -> None:
        self.log.append((self.name, n, appended))
        if self.hook is not None:
            self.hook()


@pytest.fixture
def pipes():
    made = []

    def make():
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        made.append(r)
        made.append(w)
        return r, w

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def test_only_ready_fds_are_served_once_per_drain(pipes):
    log: list = []
    reactor = Reactor(4096)
    owners = {}
    ends = {}
    for name in "abcd":
        r, w = pipes()
        owners[name] = Owner(name, log)
        ends[name] = w
        reactor.add(r, owners[name], owners[name].feed)
    assert reactor.drain() == 0 and log == []
    os.write(ends["b"], b"xy")
    os.write(ends["d"], b"z")
    assert reactor.drain() == 2
    assert sorted(log) == [("b", 2, 2), ("d", 1, 1)]
    assert bytes(owners["b"].fed) == b"xy" and bytes(owners["d"].fed) == b"z"
    assert (reactor.reads, reactor.bytes_read, reactor.drains) == (2, 3, 2)
    log.clear()
    assert reactor.drain() == 0 and log == []  # drained: nothing is reported twice
    reactor.close()


def test_the_read_budget_and_max_events_bound_one_drain(pipes):
    log: list = []
    reactor = Reactor(100, max_events=2)
    names = []
    for name in "abc":
        r, w = pipes()
        owner = Owner(name, log)
        reactor.add(r, owner, owner.feed)
        os.write(w, bytes(250))
        names.append(name)
    reads = []
    while reactor.drain():
        reads.append(list(log))
        log.clear()
    # each drain serves at most 2 fds; each fd gives at most 100 bytes per read
    assert all(len(r) <= 2 for r in reads)
    flat = [entry for r in reads for entry in r]
    for name in names:
        assert [n for who, n, _ in flat if who == name] == [100, 100, 50]
    reactor.close()


def test_eof_and_read_errors_are_reported_to_their_owner(pipes):
    log: list = []
    reactor = Reactor(4096)
    r, w = pipes()
    eof_owner = Owner("eof", log)
    reactor.add(r, eof_owner, eof_owner.feed)
    os.close(w)
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    err_owner = Owner("pty", log)
    reactor.add(master, err_owner, err_owner.feed)
    os.close(slave)  # a pty master reads EIO once its other side is gone
    reactor.drain()
    assert sorted(log) == [("eof", 0, 0), ("pty", -errno.EIO, 0)]
    reactor.remove(r)
    reactor.remove(master)
    os.close(master)
    assert len(reactor) == 0
    reactor.close()


def test_a_failing_owner_is_reported_and_the_others_are_served(pipes):
    log: list = []
    errors = []
    reactor = Reactor(4096, on_error=lambda owner, exc: errors.append((owner.name, exc)))

    def boom():
        raise RuntimeError("owner bug")

    for name in ("bad", "good"):
        r, w = pipes()
        owner = Owner(name, log, hook=boom if name == "bad" else None)
        reactor.add(r, owner, owner.feed)
        os.write(w, b"1")
    assert reactor.drain() == 2
    assert sorted(n for n, _, _ in log) == ["bad", "good"]
    assert [(n, str(e)) for n, e in errors] == [("bad", "owner bug")]
    reactor.close()


def test_an_fd_removed_during_a_drain_is_not_served(pipes):
    log: list = []
    reactor = Reactor(4096)
    r1, w1 = pipes()
    r2, w2 = pipes()
    second = Owner("second", log)
    # whichever is served first removes the other
    first = Owner("first", log, hook=lambda: reactor.remove(r2))
    second.hook = lambda: reactor.remove(r1)
    reactor.add(r1, first, first.feed)
    reactor.add(r2, second, second.feed)
    os.write(w1, b"a")
    os.write(w2, b"b")
    assert reactor.drain() == 2
    assert len(log) == 1
    reactor.close()


def test_bad_registrations_are_refused(pipes):
    reactor = Reactor(4096)
    r, _ = pipes()
    owner = Owner("x", [])
    reactor.add(r, owner, owner.feed)
    with pytest.raises(ValueError, match="already registered"):
        reactor.add(r, owner, owner.feed)
    with pytest.raises(OSError) as info:
        reactor.add(9999, owner, owner.feed)
    assert info.value.errno == errno.EBADF
    reactor.remove(12345)  # unknown: ignored
    with pytest.raises(ValueError, match="read_budget"):
        Reactor(0)
    with pytest.raises(ValueError, match="max_events"):
        Reactor(10, max_events=0)
    reactor.close()
    with pytest.raises(ValueError, match="closed"):
        reactor.fileno()


def test_hubs_share_one_reactor_per_loop_and_the_last_one_out_closes_it():
    compiled = load_impl("compiled")
    twin = load_impl("python")

    async def main():
        fds_before = set(os.listdir("/proc/self/fd"))
        hubs, writers = [], []
        for _ in range(3):
            r, w = os.pipe2(os.O_CLOEXEC)
            hub = StreamHub(compiled.TokenStream("frames"))
            hub.attach_fd(r)
            hubs.append(hub)
            writers.append(w)
        reactors = {id(h._reactor) for h in hubs}
        assert len(reactors) == 1 and None not in {h._reactor for h in hubs}
        tr, tw = os.pipe2(os.O_CLOEXEC)
        twin_hub = StreamHub(twin.TokenStream("frames"))
        twin_hub.attach_fd(tr)
        assert twin_hub._reactor is None  # the twin keeps one add_reader per fd
        watcher = hubs[1].watch()
        os.write(writers[1], (2).to_bytes(4, "little") + b"\x01hi")
        batch = await asyncio.wait_for(watcher.next_batch(), 5)
        assert b"hi" in batch
        assert hubs[1].statistics().bytes_read == 7
        for w in (*writers, tw):
            os.close(w)
        for hub in (*hubs, twin_hub):
            await hub.wait_eof()
        watcher.close()
        # every pipe end and the reactor's epoll fd are gone
        left = {fd for fd in set(os.listdir("/proc/self/fd")) - fds_before
                if os.path.exists(f"/proc/self/fd/{fd}")}
        assert left == set(), {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in left}

    asyncio.run(main())
