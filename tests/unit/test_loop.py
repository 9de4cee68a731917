"""runtime/loop.py: which event loop the daemon runs on, and the "latency" GC policy (start-up
frozen, full collections only from the loop's timer, postponed while the loop is behind)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import sys
import weakref

import pytest

from corral.runtime import loop as rl
from corral.runtime.config import load
from corral.sandbox.errors import InvalidSpec


class Node:
    def __init__(self):
        self.other = self


def test_loop_factory_picks_uvloop_when_installed_and_asyncio_when_asked():
    assert rl.loop_factory("asyncio") == (None, "asyncio")
    factory, name = rl.loop_factory("auto")
    if importlib.util.find_spec("uvloop") is None:
        assert (factory, name) == (None, "asyncio")
    else:
        import uvloop

        assert (factory, name) == (uvloop.new_event_loop, "uvloop")
    with pytest.raises(ValueError, match="event_loop 'fast' is not one of"):
        rl.loop_factory("fast")


def test_asking_for_uvloop_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        rl.loop_factory("uvloop")


def test_latency_policy_freezes_start_up_and_collects_cycles_from_its_timer():
    saved = gc.get_threshold()

    async def scenario():
        policy = rl.LatencyGc(every_s=0.05)
        policy.start(asyncio.get_running_loop())
        try:
            assert gc.get_threshold() == (saved[0], saved[1], 2**31 - 1)
            assert gc.get_freeze_count() > 0
            cycle = Node()
            gone = weakref.ref(cycle)
            del cycle
            for _ in range(100):
                await asyncio.sleep(0.02)
                if gone() is None and policy.full_runs:
                    break
            assert gone() is None and policy.full_runs >= 1
        finally:
            policy.stop()

    asyncio.run(scenario())
    assert gc.get_threshold() == saved and gc.get_freeze_count() == 0


def test_a_late_tick_postpones_the_full_collection_a_bounded_number_of_times():
    async def scenario():
        loop = asyncio.get_running_loop()
        policy = rl.LatencyGc(every_s=3600)
        policy.start(loop)
        try:
            late = loop.time() - 0.1  # the loop ran this tick 100 ms behind: a burst
            policy._tick(late, 0)
            assert policy.full_runs == 0
            assert policy._handle.when() == pytest.approx(loop.time() + 1.0, abs=0.2)
            policy._tick(late, rl.FULL_POSTPONE_MAX)  # postponed enough: collect anyway
            assert policy.full_runs == 1
            policy._tick(loop.time(), 0)  # on time: collect
            assert policy.full_runs == 2
        finally:
            policy.stop()

    asyncio.run(scenario())


def test_gc_pauses_are_counted_per_generation():
    pauses = rl.GcPauses()
    try:
        gc.collect(0)
        gc.collect(2)
        stats = pauses.statistics()
        assert stats["0"]["collections"] >= 1 and stats["2"]["collections"] >= 1
        assert stats["2"]["max_ms"] >= 0.0
    finally:
        pauses.close()
    assert pauses._on_gc not in gc.callbacks


def test_daemon_config_names_a_bad_loop_or_policy(tmp_path):
    path = tmp_path / "corral.toml"
    for line, field in (('event_loop = "fast"', "event_loop"), ('gc_policy = "off"', "gc_policy")):
        path.write_text(line + "\n")
        with pytest.raises(InvalidSpec) as exc:
            load(str(path), {})
        assert exc.value.field == field
    cfg = load(None, {})
    assert (cfg.event_loop, cfg.gc_policy) == ("auto", "latency")
