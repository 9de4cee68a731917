"""The one pool of a kind that a process keeps (sandbox/cgroup_pool.py,
sandbox/namespace_pool.py): what `enable`, `disable` and `current` share.

A slot holds at most one pool. Putting one in drains the one before; the pool is drained at
the process's exit; a forked child forgets the parent's (the ready things are the parent's:
the child makes its own if it enables one), after `in_child` has closed what the child
must not keep a copy of.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from .undertaker import undertaker


class Drains(Protocol):
    def drain(self) -> None: ...


P = TypeVar("P", bound=Drains)


class PoolSlot(Generic[P]):
    def __init__(self, in_child: Callable[[P], None] | None = None) -> None:
        self._pool: P | None = None
        self._in_child = in_child
        atexit.register(self.disable)
        os.register_at_fork(after_in_child=self._forget_in_child)

    def install(self, pool: P) -> P:
        """Keep `pool` from now on (the one before is drained first)."""
        self.disable()
        self._pool = pool
        return pool

    def disable(self) -> None:
        """Drain the pool and keep none from now on."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.drain()
            undertaker.flush()  # a refill under way ends; what it made after the drain goes

    def current(self) -> P | None:
        """The process's pool, or None when it keeps none."""
        return self._pool

    def _forget_in_child(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._in_child is not None:
            self._in_child(pool)
