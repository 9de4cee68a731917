"""Fair turns at a few slots: work waiting for them is served round robin across tenants.

The daemon's kernel work (clone, cgroup setup, destroy) runs on two long-lived spawner
threads. Handed to them first come, first served, one tenant's burst of creates and
destroys queued every other tenant's create and exec behind it. `FairSlots` keeps one FIFO
per tenant and, whenever a slot frees, gives it to the next tenant in turn: a tenant with
one request waits for at most one request of each busier tenant, whatever they queued.

A key may also be held to fewer slots than there are (`turn(key, limit=...)`): the daemon
keeps tenants that are not operators to one spawner less than it has, so a slot is free
for everyone else the moment they ask, however hard one tenant pushes.

Plain asyncio on the daemon's loop; no threads of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque


class FairSlots:
    """At most `slots` holders at once; waiters are served round robin by key."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self._free = slots
        self._held: dict[str, int] = {}  # key -> slots it holds
        # key -> its waiters as (future, limit), in the order keys get their next turn
        self._queues: OrderedDict[str, deque[tuple[asyncio.Future, int | None]]] = \
            OrderedDict()

    @contextlib.asynccontextmanager
    async def turn(self, key: str, limit: int | None = None):
        """Hold a slot for the body; wait for a fair turn first when none is free, or when
        `key` already holds `limit` slots."""
        if self._free and not self._queues and self._under(key, limit):
            self._take(key)
        else:
            fut = asyncio.get_running_loop().create_future()
            self._queues.setdefault(key, deque()).append((fut, limit))
            self._grant()  # a slot may be free for us while others wait at their limit
            try:
                await fut  # the slot is taken for us (_grant) before this resumes
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release(key)  # granted, then cancelled before it could start
                else:
                    self._forget(key, fut)
                raise
        try:
            yield
        finally:
            self._release(key)

    def waiting(self) -> dict[str, int]:
        """Waiters per key (for statistics)."""
        return {k: len(q) for k, q in self._queues.items()}

    def _under(self, key: str, limit: int | None) -> bool:
        return limit is None or self._held.get(key, 0) < limit

    def _take(self, key: str) -> None:
        self._free -= 1
        self._held[key] = self._held.get(key, 0) + 1

    def _release(self, key: str) -> None:
        self._free += 1
        self._held[key] -= 1
        if not self._held[key]:
            del self._held[key]
        self._grant()

    def _grant(self) -> None:
        """Give free slots to waiting keys in turn, skipping keys at their limit."""
        while self._free:
            for key, queue in self._queues.items():
                fut, limit = queue[0]
                if self._under(key, limit):
                    break
            else:
                return  # everyone waiting is at its limit
            queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # its next request waits for everyone else
            else:
                del self._queues[key]
            if not fut.done():
                self._take(key)
                fut.set_result(None)

    def _forget(self, key: str, fut: asyncio.Future) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            for item in queue:
                if item[0] is fut:
                    queue.remove(item)
                    break
            if not queue:
                del self._queues[key]
