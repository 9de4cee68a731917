"""`corral daemon --namespace-pool-size N`: sandboxes' PID 1s join (user, network) namespace
pairs the daemon made ahead, one each; a stop gives back every range and descriptor of the
ready ones, and after a SIGKILL the next start's sweep frees their ranges."""

from __future__ import annotations

import os

import pytest

from .daemon_harness import DaemonProcess, collect_exec, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def _namespace_fds(pid: int) -> list[str]:
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith(("user:[", "net:[")):
            held.append(link)
    return held


def test_sandboxes_join_pairs_made_ahead_and_a_stop_gives_every_one_back(tmp_path):
    d = DaemonProcess(tmp_path, args=("--namespace-pool-size", "2")).start()
    try:
        assert wait_until(lambda: len(d.pool_id_slots()) == 2, 10)
        ready = set(_namespace_fds(d.pid))
        assert len(ready) == 4
        c = d.client(tenant="pooled")
        sb = c.create_sandbox()
        result = collect_exec(c.exec(sb.id, ["sh", "-c", "readlink /proc/self/ns/net "
                                                         "/proc/self/ns/user; cat /proc/net/dev"]))
        assert result.returncode == 0
        net, user, *dev = result.stdout.decode().splitlines()
        assert {net, user} <= ready  # one of the pairs the daemon held
        assert [line.split(":")[0].strip() for line in dev[2:]] == ["lo"]
        # the pair is the sandbox's alone now: the daemon no longer holds it
        assert not {net, user} & set(_namespace_fds(d.pid))
        c.destroy_sandbox(sb.id)
        pid = d.pid
    finally:
        assert d.stop() == 0, d.log()
    assert d.leftovers() == {}
    assert d.pool_id_slots() == []
    assert pid


def test_a_killed_daemons_pool_ranges_are_freed_by_the_next_start(tmp_path):
    d = DaemonProcess(tmp_path, args=("--namespace-pool-size", "2")).start()
    assert wait_until(lambda: len(d.pool_id_slots()) == 2, 10)
    held = d.pool_id_slots()
    d.kill()
    assert all(os.path.exists(path) for path in held)  # nobody gave them back
    d2 = DaemonProcess(tmp_path / "again").start()  # its start sweeps the id pool
    try:
        assert not any(os.path.exists(path) for path in held)
    finally:
        assert d2.stop() == 0, d2.log()
