"""User and network namespaces made ahead: a sandbox's start joins a ready pair.

Making a network namespace is the largest kernel cost of a sandbox's start: the kernel
registers its loopback device and builds its sysctl tables and per-protocol state (about
0.4 ms of a core here, more than all of PID 1's mounts). A process that starts sandboxes
often (the daemon: `namespace_pool_size`, 4) keeps a few (user namespace, network
namespace) pairs ready, and PID 1 joins a pair instead of creating it
(`_spawn.spawn_init(namespaces=...)`); it still creates its PID, mount, UTS, IPC and cgroup
namespaces itself, in that user namespace.

- **Each pair is made for one sandbox and used once.** A pair is made by a holder process
  that does nothing in it (`_spawn.sandbox_namespaces`): a new user namespace with one of
  Corral's id ranges mapped (taken from the id pool for it, sandbox/ids.py) and a network
  namespace that user namespace owns, created as the range's host uid with the per-user
  limits lifted, exactly as PID 1's launcher creates them. Nothing runs in either before
  the sandbox's PID 1, which brings loopback up itself as it always does; once the
  sandbox is destroyed both namespaces are gone with its processes. No sandbox ever joins
  a namespace another one used (tests/linux/test_namespace_pool.py).
- **Who takes one.** A privileged start whose spec names no host ids (`uid_base`): the
  sandbox takes the pair's id range as its own, so its maps are those the pair was made
  with. Rootless starts map their ids with setuid helpers and make their own.
- **Refilled in the background.** Every take wakes a refill on the undertaker's thread
  (sandbox/undertaker.py), back to `size` (nothing comes back to the pool, so every pair
  taken is one to make: at rest it holds exactly `size`). A take that finds none returns
  None and the start makes its namespaces as before.
- **What is held.** Two descriptors and one id range per ready pair; the ranges' slot files
  name this process, so a crashed one's are freed by the id pool's sweep like any other,
  and the namespaces die with the descriptors. `drain()` (the daemon's stop, and at exit)
  closes them and gives the ranges back.

The pool is off unless `enable(size)` is called: a one-shot `corral run` would only make
namespaces it never uses.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from . import ids
from .pool_slot import PoolSlot
from .undertaker import undertaker

log = logging.getLogger("corral.sandbox.namespace_pool")

#: Ready pairs at most.
MAX_SIZE = 64


@dataclass(eq=False)
class ReadyNamespaces:
    """One ready pair and the id range its user namespace maps; one sandbox's."""

    ids: ids.IdRange
    user_fd: int
    net_fd: int

    def hand_over(self) -> tuple[int, int]:
        """(user namespace fd, network namespace fd), the caller's to close from now on
        (spawn_init closes them); the range stays the caller's to release."""
        fds = (self.user_fd, self.net_fd)
        self.user_fd = self.net_fd = -1
        return fds

    def close(self) -> None:
        """Close what was not handed over; idempotent. The id range is not released."""
        for fd in self.hand_over():
            if fd >= 0:
                os.close(fd)


def make_namespaces() -> ReadyNamespaces:
    """A new pair with an id range of its own (root only).

    Raises:
        IdPoolError, ResourceExhausted: no id range to map (ids.allocate).
        OSError: the kernel refused a step (`_spawn.sandbox_namespaces`).
    """
    from corral.ext import _spawn

    taken = ids.allocate(POOL_OWNER)
    try:
        id_map = f"0 {taken.base} {taken.count}\n".encode()
        user_fd, net_fd = _spawn.sandbox_namespaces(id_map, id_map, taken.base)
    except BaseException:
        taken.release()
        raise
    return ReadyNamespaces(taken, user_fd, net_fd)


#: What an id range's slot file names as its sandbox while the range waits in the pool.
POOL_OWNER = "namespace-pool"


class NamespacePool:
    """Ready (user, network) namespace pairs of this process."""

    def __init__(self, size: int) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise ValueError(f"a namespace pool holds 1-{MAX_SIZE}, not {size}")
        self.size = size
        self._lock = threading.Lock()
        self._ready: list[ReadyNamespaces] = []
        self._refilling = False
        self._closed = False
        #: Starts that took a ready pair, and those that found none.
        self.hits = 0
        self.misses = 0

    def take(self) -> ReadyNamespaces | None:
        """A ready pair (the caller's from now on: hand its descriptors to spawn_init and
        release its id range with the sandbox), or None."""
        with self._lock:
            if self._closed:
                return None
            ready = self._ready.pop() if self._ready else None
            if ready is None:
                self.misses += 1
            else:
                self.hits += 1
            work = not self._refilling
            if work:
                self._refilling = True
        if work:
            undertaker.bury(self._refill)
        return ready

    def ready(self) -> int:
        """How many pairs are ready now."""
        with self._lock:
            return len(self._ready)

    def drain(self) -> None:
        """Close every ready pair and give its range back; the pool makes no more."""
        with self._lock:
            self._closed = True
            idle, self._ready = self._ready, []
        for pair in idle:
            _discard(pair)

    def _refill(self) -> None:
        """Make pairs until `size` are ready (the undertaker's thread). A failure ends the
        refill (logged); the next take tries again."""
        try:
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self.size:
                        return
                try:
                    pair = make_namespaces()
                except (OSError, ids.IdPoolError, ids.ResourceExhausted) as exc:
                    log.warning("making a sandbox's namespaces ahead failed: %s", exc)
                    return
                with self._lock:
                    kept = not self._closed
                    if kept:
                        self._ready.append(pair)
                if not kept:
                    _discard(pair)
        finally:
            with self._lock:
                self._refilling = False


def _discard(pair: ReadyNamespaces) -> None:
    pair.close()
    pair.ids.release()


# -- the process's pool ------------------------------------------------------------------------


def _close_in_child(pool: NamespacePool) -> None:
    """A forked child closes its copies of the parent's ready pairs (the ranges stay the
    parent's): they would keep those namespaces alive after the parent used them."""
    for pair in pool._ready:
        pair.close()


_slot: PoolSlot[NamespacePool] = PoolSlot(in_child=_close_in_child)


def enable(size: int) -> NamespacePool | None:
    """Keep `size` pairs ready in this process (0: none, the default), made from now on in
    the background; returns the pool, or None when there is none (size 0, or not root:
    only root maps an id range of Corral's pool)."""
    _slot.disable()
    if size <= 0 or os.geteuid() != 0:
        return None
    pool = _slot.install(NamespacePool(size))
    with pool._lock:
        pool._refilling = True
    undertaker.bury(pool._refill)
    return pool


#: Close the ready pairs and keep none from now on.
disable = _slot.disable
#: The process's pool, or None when it keeps none.
current = _slot.current
