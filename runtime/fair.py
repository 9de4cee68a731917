"""Fair turns at a few slots: work waiting for them is served round robin across tenants.

The daemon's kernel work (clone, cgroup setup, destroy) runs on two long-lived spawner
threads. Handed to them first come, first served, one tenant's burst of creates and
destroys queued every other tenant's create and exec behind it. `FairSlots` keeps one FIFO
per tenant and, whenever a slot frees, gives it to the next tenant in turn: a tenant with
one request waits for at most one request of each busier tenant, whatever they queued.

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
        # key -> its waiters, in the order keys get their next turn
        self._queues: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()

    @contextlib.asynccontextmanager
    async def turn(self, key: str):
        """Hold a slot for the body; wait for a fair turn first when none is free."""
        if self._free and not self._queues:
            self._free -= 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._queues.setdefault(key, deque()).append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()  # granted, then cancelled before it could start
                else:
                    self._forget(key, fut)
                raise
        try:
            yield
        finally:
            self._release()

    def waiting(self) -> dict[str, int]:
        """Waiters per key (for statistics)."""
        return {k: len(q) for k, q in self._queues.items()}

    def _release(self) -> None:
        while self._queues:
            key, queue = next(iter(self._queues.items()))
            fut = queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # its next request waits for everyone else
            else:
                del self._queues[key]
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    def _forget(self, key: str, fut: asyncio.Future) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(fut)
            if not queue:
                del self._queues[key]
