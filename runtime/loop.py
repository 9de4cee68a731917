"""The daemon's event loop and cyclic garbage collector, chosen for latency (issue 21).

Event loop (`event_loop` in the daemon config):
  "auto" (default) uses uvloop when it is installed (`pip install corral[fast]`), else
  asyncio's own loop; "uvloop" requires it; "asyncio" never uses it. grpc.aio runs on both.

Garbage collector (`gc_policy`):
  "latency" (default). A full (generation 2) collection stops the loop for as long as it
  takes to walk every tracked object: 36 ms was seen under the 256-session bench, where a
  token's whole budget is 20 ms. So:
  * once start-up is done, `gc.collect()` then `gc.freeze()`: what imports, protobuf
    descriptors and the daemon's own tables made moves to the permanent generation, which
    no collection walks again;
  * allocation never triggers a full collection (its threshold is out of reach): a timer
    on the loop runs one every `FULL_EVERY_S`, at a moment the loop is on time (it waits
    up to `FULL_POSTPONE_MAX` seconds for a tick that is less than `BUSY_LAG_S` late), so
    a full pause lands between bursts rather than inside one. Garbage in reference cycles
    waits for that timer at most `FULL_EVERY_S` plus the postponement.
  * generations 0 and 1 keep Python's thresholds: they walk only young objects.
  "default" leaves the collector as Python sets it.

`GcPauses` records every collection's pause per generation (gc.callbacks); the daemon's
statistics carry it, so a bench or an operator sees what the collector costs.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger("corral.daemon")

EVENT_LOOPS = ("auto", "asyncio", "uvloop")
GC_POLICIES = ("latency", "default")
FULL_EVERY_S = 60.0
FULL_POSTPONE_MAX = 10
BUSY_LAG_S = 0.005
#: Out of reach: a full collection only when the timer asks for one.
_NEVER = 2**31 - 1


def loop_factory(kind: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The factory for asyncio.Runner and the name of the loop it makes.

    Raises:
        RuntimeError: "uvloop" asked for and not installed.
    """
    if kind not in EVENT_LOOPS:
        raise ValueError(f"event_loop {kind!r} is not one of {', '.join(EVENT_LOOPS)}")
    if kind == "asyncio" or (kind == "auto" and importlib.util.find_spec("uvloop") is None):
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        raise RuntimeError("event_loop = \"uvloop\" but uvloop is not installed "
                           "(pip install uvloop, or event_loop = \"auto\")") from None
    return uvloop.new_event_loop, "uvloop"


class GcPauses:
    """Every collection's pause, per generation: count, total and longest (seconds)."""

    def __init__(self) -> None:
        self.by_generation: dict[int, list[float]] = {}
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        row = self.by_generation.setdefault(info["generation"], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += pause
        row[2] = max(row[2], pause)

    def statistics(self) -> dict:
        return {str(g): {"collections": int(c), "total_ms": round(t * 1000, 3),
                         "max_ms": round(m * 1000, 3)}
                for g, (c, t, m) in sorted(self.by_generation.items())}

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


class LatencyGc:
    """The "latency" policy: freeze what start-up made; full collections on a timer, at an
    on-time tick of the loop. `start` after start-up, `stop` at shutdown (restores Python's
    thresholds and unfreezes, so an embedding process is left as it was)."""

    def __init__(self, every_s: float = FULL_EVERY_S) -> None:
        self.every_s = every_s
        self.full_runs = 0
        self._saved = gc.get_threshold()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        gc.collect()
        gc.freeze()
        gc.set_threshold(self._saved[0], self._saved[1], _NEVER)
        self._arm(self.every_s, 0)

    def _arm(self, delay: float, postponed: int) -> None:
        due = self._loop.time() + delay
        self._handle = self._loop.call_at(due, self._tick, due, postponed)

    def _tick(self, due: float, postponed: int) -> None:
        late = self._loop.time() - due
        if late > BUSY_LAG_S and postponed < FULL_POSTPONE_MAX:
            self._arm(1.0, postponed + 1)  # the loop is behind: a burst; try again soon
            return
        gc.collect()
        self.full_runs += 1
        self._arm(self.every_s, 0)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        gc.set_threshold(*self._saved)
        gc.unfreeze()
