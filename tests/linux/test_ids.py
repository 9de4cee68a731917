"""Host ids: every sandbox has its own range of Corral's pool, registered like dockremap's.

Through the real CLI, as root: two sandboxes that run at the same time map to disjoint
ranges inside the `corral` entry of /etc/subuid and /etc/subgid, which overlaps no other
entry (a user `useradd` makes afterwards gets a range elsewhere); a range is given back
when its sandbox ends, and by the next start's sweep when its owner was killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from corral.sandbox import Sandbox, SandboxSpec, ids
from corral.sandbox.procinfo import live_start_time

from ..processes import wait_until

CORRAL = str(Path(sys.executable).with_name("corral"))


def corral_popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([CORRAL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def slots_of(pid: int) -> list[str]:
    """Slot files that name process pid as their owner."""
    found = []
    directory = ids.state_dir()
    for name in os.listdir(directory):
        if name.isdigit():
            try:
                with open(os.path.join(directory, name)) as f:
                    if json.loads(f.readline()).get("pid") == pid:
                        found.append(name)
            except (OSError, ValueError):
                continue
    return found


def map_line(text: str) -> tuple[int, int, int]:
    inside, outside, count = (int(x) for x in text.split())
    return inside, outside, count


def test_pool_is_registered_in_subuid_and_subgid_and_overlaps_no_other_entry():
    subprocess.run([CORRAL, "run", "--", "true"], check=True, timeout=60)
    pool = ids.pool()
    for path in (ids.SUBUID, ids.SUBGID):
        entries = ids.parse_subids(Path(path).read_text())
        mine = [e for e in entries if e.name == "corral"]
        assert mine == [ids.SubIdEntry("corral", pool.start, pool.count)]
        others = [e for e in entries if e.name != "corral"]
        assert [e for e in others if e.start < pool.end and pool.start < e.end] == []
    assert pool.count % ids.RANGE == 0 and pool.count >= ids.RANGE


def test_a_user_added_later_gets_subordinate_ids_outside_the_pool():
    name = "ctid" + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--no-create-home", name], check=True)
    try:
        pool = ids.pool()
        for path in (ids.SUBUID, ids.SUBGID):
            theirs = [e for e in ids.parse_subids(Path(path).read_text()) if e.name == name]
            assert len(theirs) == 1
            assert theirs[0].end <= pool.start or theirs[0].start >= pool.end
    finally:
        subprocess.run(["userdel", name], check=True)


def test_two_sandboxes_at_once_never_share_a_host_id(tmp_path):
    """Each waits for the other's map: both are running when they read their own."""
    sync = tmp_path / "sync"
    sync.mkdir()
    script = ("cat /proc/self/uid_map > /sync/{me}; cat /proc/self/gid_map >> /sync/{me}; "
              "while [ ! -s /sync/{other} ]; do sleep 0.01; done; cat /proc/self/uid_map")
    runs = [corral_popen("run", "--rw", f"{sync}:/sync", "--timeout", "60s", "--", "sh", "-c",
                         script.format(me=me, other=other))
            for me, other in (("a", "b"), ("b", "a"))]
    outs = [p.communicate(timeout=90) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs
    maps = {}
    for me in ("a", "b"):
        uid_line, gid_line = (sync / me).read_text().splitlines()
        assert map_line(uid_line) == map_line(gid_line)
        maps[me] = map_line(uid_line)
    (_, a, n), (_, b, m) = maps["a"], maps["b"]
    assert n == m == ids.RANGE
    assert a + n <= b or b + m <= a  # disjoint
    pool = ids.pool()
    for base in (a, b):
        assert pool.start <= base and base + ids.RANGE <= pool.end
        assert (base - pool.start) % ids.RANGE == 0
    for p in runs:
        assert slots_of(p.pid) == []  # given back at the end


def test_the_range_of_a_killed_caller_is_swept_by_the_next_start(tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    victim = corral_popen("run", "--rw", f"{ready}:/ready", "--", "sh", "-c",
                          "touch /ready/up; exec sleep 600")
    try:
        assert wait_until(lambda: (ready / "up").exists(), timeout_s=60)
        [slot] = slots_of(victim.pid)
        with open(os.path.join(ids.state_dir(), slot)) as f:
            init_pid = json.loads(f.read().splitlines()[1])["init_pid"]  # noted at start
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert slots_of(victim.pid) == [slot]  # nobody gave it back
    # PID 1 dies with its caller (PDEATHSIG); once it is gone the next start sweeps
    assert wait_until(lambda: live_start_time(init_pid) is None, timeout_s=60)
    subprocess.run([CORRAL, "run", "--", "true"], check=True, timeout=60)
    assert slots_of(victim.pid) == []


def test_a_spec_that_names_its_ids_keeps_them():
    with Sandbox.create(SandboxSpec(uid_base=300000, uid_count=65536)) as sb:
        out, _ = sb.exec(["cat", "/proc/self/uid_map"]).communicate()
        assert map_line(out.decode()) == (0, 300000, 65536)
        assert sb._ids is None


def test_api_sandboxes_fix_their_range_in_their_spec_and_release_it():
    sb = Sandbox.create()
    try:
        assert sb.spec.uid_base is not None and sb.spec.uid_count == ids.RANGE
        slot = sb._ids.path
        assert os.path.exists(slot)
        out, _ = sb.exec(["cat", "/proc/self/uid_map"]).communicate()
        assert map_line(out.decode()) == (0, sb.spec.uid_base, ids.RANGE)
    finally:
        sb.destroy()
    assert not os.path.exists(slot)


def test_a_named_pool_that_overlaps_a_users_range_is_refused():
    name = "ctid" + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--no-create-home", name], check=True)
    try:
        theirs = next(e for e in ids.parse_subids(Path(ids.SUBUID).read_text())
                      if e.name == name)
        start = theirs.start - theirs.start % ids.RANGE
        r = subprocess.run([CORRAL, "run", "--", "true"], capture_output=True, text=True,
                           env={**os.environ, "CORRAL_ID_POOL": f"{start}:{2 * ids.RANGE}"},
                           timeout=60)
    finally:
        subprocess.run(["userdel", name], check=True)
    assert r.returncode == 125
    assert r.stderr.startswith(f"corral: run: CORRAL_ID_POOL='{start}:{2 * ids.RANGE}' "
                               f"overlaps '")
    assert r.stderr.endswith(f"' in {ids.SUBUID}; pick a span no entry has\n")


def test_a_named_pool_is_used_as_given(tmp_path):
    start = ids.MAX_ID // ids.RANGE * ids.RANGE - 4 * ids.RANGE  # high, away from the rest
    env = {**os.environ, "CORRAL_ID_POOL": f"{start}:{2 * ids.RANGE}"}
    r = subprocess.run([CORRAL, "run", "--", "cat", "/proc/self/uid_map"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    _, base, count = map_line(r.stdout)
    assert base in (start, start + ids.RANGE) and count == ids.RANGE
