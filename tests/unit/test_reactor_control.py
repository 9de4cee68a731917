"""Control before output (issue 21): a steering request that arrives while the reactor drains
a flood of agent output is written to the agent's control pipe before the flood is served.

Real pipes, a real Reactor and real event loops (asyncio's and uvloop's); the assertions are
on the order of events, never on a time.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import uvloop

from corral.ext import agent as protocol
from corral.ext._reactor import (
    DEFAULT_MAX_DRAIN_US,
    DEFAULT_PRIORITY_AFTER_US,
    PRIORITY_EVERY,
    Reactor,
)
from corral.runtime.streams import ControlWriter, StreamHub, prefer_readable

from .test_reactor import Owner, pipes  # noqa: F401 - the fixture
from .test_stream_core import load_impl


def _flooded(pipes, reactor, names, log, hooks=None):  # noqa: F811
    """One ready pipe per name, registered with the reactor; returns the write ends."""
    writers = {}
    for name in names:
        r, w = pipes()
        owner = Owner(name, log, hook=(hooks or {}).get(name))
        reactor.add(r, owner, owner.feed)
        os.write(w, b"x" * 64)
        writers[name] = w
    return writers


def test_a_ready_priority_fd_cuts_the_drain_and_the_rest_keeps_its_turn(pipes):  # noqa: F811
    log: list = []
    # no time budget in the way: a preempted drain must not end before its first look
    reactor = Reactor(16, max_drain_us=10**9, priority_after_us=0)
    pr, pw = pipes()
    reactor.set_priority_fds([pr])
    names = [f"agent{i}" for i in range(16)]
    # the second agent served makes the "request" arrive, in the middle of the drain
    arrive = {"n": 0}

    def maybe_arrive():
        arrive["n"] += 1
        if arrive["n"] == 2:
            os.write(pw, b"!")

    _flooded(pipes, reactor, names, log, {n: maybe_arrive for n in names})
    assert reactor.drain() == PRIORITY_EVERY
    assert reactor.yields == 1
    first = [who for who, _, _ in log]
    log.clear()
    os.read(pr, 1)  # the loop's callback for the priority fd ran
    # the fds the cut drain left are served next, each once, before any is served again
    while len(log) < len(names) - PRIORITY_EVERY:
        assert reactor.drain() > 0
    rest = [who for who, _, _ in log]
    assert sorted(first + rest) == sorted(names)
    reactor.close()


def test_a_drain_stops_at_its_time_budget(pipes):  # noqa: F811
    log: list = []
    reactor = Reactor(16, max_drain_us=1)
    slow = {n: (lambda: _spend(0.0001)) for n in "abc"}  # each fd outlasts the budget
    _flooded(pipes, reactor, "abc", log, slow)
    assert [reactor.drain() for _ in range(3)] == [1, 1, 1]
    assert reactor.time_cuts == 2  # the last fd of the list ends its drain anyway
    assert sorted(who for who, _, _ in log) == ["a", "b", "c"]
    reactor.close()


def test_bad_priority_fds_are_refused():
    reactor = Reactor(16)
    with pytest.raises(ValueError, match=r"^at most 8 priority fds, got 9$"):
        reactor.set_priority_fds(range(9))
    with pytest.raises(ValueError, match=r"^priority fd -1 is not a file descriptor$"):
        reactor.set_priority_fds([-1])
    with pytest.raises(ValueError, match=r"^max_drain_us must be at least 1, got 0$"):
        Reactor(16, max_drain_us=0)
    with pytest.raises(ValueError, match=r"^priority_after_us must be 0 or more, got -1$"):
        Reactor(16, priority_after_us=-1)
    reactor.close()


AGENTS = 64
#: the read whose notification makes the request arrive (mid-drain)
ARRIVES_AT = 3
#: what handing one read on costs at least here (CPU spent in the notification: the budgets
#: count the loop thread's CPU time, not time preempted): the drain looks at gRPC's socket after
#: DEFAULT_PRIORITY_AFTER_US (the 4th read) and ends at DEFAULT_MAX_DRAIN_US (the 16th)
READ_COST_S = DEFAULT_PRIORITY_AFTER_US / PRIORITY_EVERY / 1e6


def _spend(seconds: float) -> None:
    """Use this much of the thread's CPU time: the clock the reactor's budgets count."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def _interrupt_during_flood() -> tuple[list, bytes]:
    """64 agents with output waiting, a request that arrives while the loop drains them,
    handled by the loop's callback for its socket: the events in the order they happened,
    and what the agent read from its control pipe."""
    compiled = load_impl("compiled")
    loop = asyncio.get_running_loop()
    events: list = []
    request_r, request_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # stands for gRPC's socket
    control_r, control_w = os.pipe2(os.O_CLOEXEC)
    control = ControlWriter(control_w)
    hubs, writers = [], []

    def on_request() -> None:
        os.read(request_r, 1)
        control.send_interrupt()
        events.append("control")

    def notified(i: int):
        def note() -> None:
            _spend(READ_COST_S)
            events.append(i)
            if len(events) == ARRIVES_AT:
                os.write(request_w, b"!")
        return note

    prefer_readable(loop, (request_r,))
    loop.add_reader(request_r, on_request)
    try:
        for i in range(AGENTS):
            r, w = os.pipe2(os.O_CLOEXEC)
            hub = StreamHub(compiled.TokenStream("text"), read_budget=4096)
            hub.add_notify(notified(i))
            hub.attach_fd(r)
            hubs.append(hub)
            writers.append(w)
            os.write(w, b"t" * 8192)  # two reads' worth: every fd stays ready
        while len([e for e in events if e != "control"]) < 2 * AGENTS:
            await asyncio.sleep(0)
        return events, os.read(control_r, 64)
    finally:
        loop.remove_reader(request_r)
        prefer_readable(loop, ())
        for w in writers:
            os.close(w)
        for hub in hubs:
            hub.close()
        control.close()
        for fd in (request_r, request_w, control_r):
            os.close(fd)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_an_interrupt_during_a_flood_is_written_before_the_flood_is_served(loop_kind):
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        events, frame = runner.run(_interrupt_during_flood())
    assert frame == protocol.encode_frame(protocol.INTERRUPT)
    at = events.index("control")
    reads = [e for e in events if e != "control"]
    # written once the drain had run long enough to look (4 reads), before the time budget
    # (16 reads) or the 64 ready fds; a second drain may serve 4 more first
    assert DEFAULT_MAX_DRAIN_US // DEFAULT_PRIORITY_AFTER_US * PRIORITY_EVERY == 16
    assert ARRIVES_AT <= at <= 2 * PRIORITY_EVERY
    # and no agent lost its turn: each was read once before any was read twice
    assert sorted(reads[:AGENTS]) == list(range(AGENTS))


def test_grpc_wakeup_fds_are_the_sockets_that_wake_the_loop_for_grpc(tmp_path):
    import stat

    import grpc

    from corral.runtime.api.sessions import grpc_wakeup_fds

    async def main() -> list[bool]:
        server = grpc.aio.server()
        server.add_insecure_port(f"unix:{tmp_path}/s.sock")
        await server.start()
        try:
            return [stat.S_ISSOCK(os.fstat(fd).st_mode) for fd in grpc_wakeup_fds()]
        finally:
            await server.stop(None)

    # grpc.aio's poller: one socketpair, whose read end the loop watches
    assert asyncio.run(main()) == [True, True]
