"""The one pool of a kind a process keeps (sandbox/pool_slot.py): what cgroup_pool and
namespace_pool share for enable, disable, current, the process's exit and fork."""

import os

from corral.sandbox.pool_slot import PoolSlot


class FakePool:
    """A pool that only counts its drains (the slot's part is what is under test)."""

    def __init__(self) -> None:
        self.drains = 0
        self.closed_in_child = False

    def drain(self) -> None:
        self.drains += 1


def test_installing_a_pool_drains_the_one_before_and_disable_drains_the_last():
    slot: PoolSlot[FakePool] = PoolSlot()
    first, second = FakePool(), FakePool()
    assert slot.current() is None
    assert slot.install(first) is first
    assert slot.current() is first
    slot.install(second)
    assert (first.drains, second.drains) == (1, 0)
    assert slot.current() is second
    slot.disable()
    assert second.drains == 1
    assert slot.current() is None
    slot.disable()  # nothing kept: nothing drained twice
    assert (first.drains, second.drains) == (1, 1)


def test_a_forked_child_forgets_the_parents_pool_after_in_child_ran():
    def close(pool: FakePool) -> None:
        pool.closed_in_child = True

    slot: PoolSlot[FakePool] = PoolSlot(in_child=close)
    pool = slot.install(FakePool())
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports what it sees, never drains the parent's pool
        os.close(read_end)
        seen = f"{slot.current() is None} {pool.closed_in_child} {pool.drains}"
        os.write(write_end, seen.encode())
        os._exit(0)
    os.close(write_end)
    try:
        seen = os.read(read_end, 100).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert seen == "True True 0"
    # the parent keeps its pool, untouched by the child's hook
    assert slot.current() is pool
    assert not pool.closed_in_child
    slot.disable()
