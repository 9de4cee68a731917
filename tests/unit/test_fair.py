"""FairSlots: slots are handed out round robin across keys, and cancellation never leaks one."""

from __future__ import annotations

import asyncio

import pytest

from corral.runtime.fair import FairSlots


def run(coro):
    return asyncio.run(coro)


def test_a_burst_does_not_queue_another_key_behind_it():
    order: list[str] = []

    async def main():
        slots = FairSlots(1)
        gate = asyncio.Event()

        async def job(key, name, hold=False):
            async with slots.turn(key):
                order.append(name)
                if hold:
                    await gate.wait()

        first = asyncio.create_task(job("a", "a0", hold=True))
        await asyncio.sleep(0)
        burst = [asyncio.create_task(job("a", f"a{i}")) for i in range(1, 6)]
        await asyncio.sleep(0)
        late = [asyncio.create_task(job("b", "b1")), asyncio.create_task(job("c", "c1"))]
        await asyncio.sleep(0)
        assert slots.waiting() == {"a": 5, "b": 1, "c": 1}
        gate.set()
        await asyncio.gather(first, *burst, *late)
        assert slots.waiting() == {}

    run(main())
    assert order == ["a0", "a1", "b1", "c1", "a2", "a3", "a4", "a5"]


def test_cancelled_waiters_and_holders_give_their_slot_back():
    async def main():
        slots = FairSlots(1)
        gate = asyncio.Event()

        async def hold():
            async with slots.turn("a"):
                await gate.wait()

        async def quick(key):
            async with slots.turn(key):
                return key

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(quick("b"))
        await asyncio.sleep(0)
        waiter.cancel()  # cancelled while queued
        await asyncio.sleep(0)
        assert slots.waiting() == {}
        holder.cancel()  # cancelled while holding
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert await asyncio.wait_for(quick("c"), 1) == "c"
        # granted and cancelled before it ran: the slot goes on to the next waiter
        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        granted = asyncio.create_task(quick("d"))
        after = asyncio.create_task(quick("e"))
        await asyncio.sleep(0)
        gate.set()
        await holder
        granted.cancel()
        assert await asyncio.wait_for(after, 1) == "e"

    run(main())


def test_slots_must_exist():
    with pytest.raises(ValueError, match="^slots must be at least 1, got 0$"):
        FairSlots(0)


def test_a_key_at_its_limit_leaves_a_slot_free_for_others():
    async def main():
        slots = FairSlots(2)
        gate = asyncio.Event()
        started: list[str] = []

        async def job(key, name, limit):
            async with slots.turn(key, limit):
                started.append(name)
                await gate.wait()

        a = [asyncio.create_task(job("a", f"a{i}", 1)) for i in range(3)]
        await asyncio.sleep(0)
        assert started == ["a0"] and slots.waiting() == {"a": 2}  # one slot stays free
        b = asyncio.create_task(job("b", "b0", 1))
        await asyncio.sleep(0)
        assert started == ["a0", "b0"]  # at once, on the slot a could not take
        unlimited = asyncio.create_task(job("ops", "ops0", None))
        await asyncio.sleep(0)
        assert "ops0" not in started  # both slots are busy now: it waits its turn
        gate.set()
        await asyncio.gather(*a, b, unlimited)
        assert sorted(started) == ["a0", "a1", "a2", "b0", "ops0"]

    run(main())
