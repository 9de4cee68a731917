"""Through the real daemon: each sandbox has its own host ids, and its workspace is writable.

Two sandboxes created side by side map root inside to disjoint ranges of Corral's pool;
a file the API writes is the sandbox root's to change, a file the sandbox writes is read
back by the API; destroying a sandbox gives its range back; `corral inspect` shows the map
it runs under and finds nothing to flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from corral.sandbox import ids

from .daemon_harness import collect_exec


def slot_of(sandbox_id: str) -> str | None:
    """The id slot naming the sandbox: in its first record (a range taken for it), or in
    its PID 1's (one a namespace pool took ahead, sandbox/namespace_pool.py)."""
    directory = ids.state_dir()
    for name in os.listdir(directory):
        if name.isdigit():
            try:
                with open(os.path.join(directory, name)) as f:
                    records = [json.loads(line) for line in f if line.strip()]
            except (OSError, ValueError):
                continue
            if any(r.get("sandbox") == sandbox_id for r in records):
                return name
    return None


def uid_map(client, sandbox_id: str) -> tuple[int, int, int]:
    res = collect_exec(client.exec(sandbox_id, ["cat", "/proc/self/uid_map"]))
    assert res.returncode == 0, res.stderr
    inside, outside, count = (int(x) for x in res.stdout.split())
    return inside, outside, count


def test_two_daemon_sandboxes_have_disjoint_ranges_given_back_on_destroy(client):
    a, b = client.create_sandbox(), client.create_sandbox()
    try:
        (_, base_a, n), (_, base_b, m) = uid_map(client, a.id), uid_map(client, b.id)
        assert n == m == ids.RANGE
        assert base_a + n <= base_b or base_b + m <= base_a
        pool = ids.pool()
        assert pool.start <= min(base_a, base_b) and max(base_a, base_b) + n <= pool.end
        assert slot_of(a.id) is not None and slot_of(b.id) is not None
    finally:
        client.destroy_sandbox(a.id)
        client.destroy_sandbox(b.id)
    assert slot_of(a.id) is None and slot_of(b.id) is None


def test_daemon_workspace_is_writable_both_ways(client):
    sb = client.create_sandbox()
    try:
        client.write_file(sb.id, "given.txt", b"from the api\n")
        res = collect_exec(client.exec(sb.id, ["sh", "-c",
                                                "echo changed >> given.txt && mkdir sub && "
                                                "echo made > sub/made.txt && stat -c '%u %g' "
                                                "given.txt sub sub/made.txt"]))
        assert (res.returncode, res.stderr) == (0, b"")
        assert res.stdout == b"0 0\n0 0\n0 0\n"
        assert client.read_file(sb.id, "given.txt") == b"from the api\nchanged\n"
        assert client.read_file(sb.id, "sub/made.txt") == b"made\n"
    finally:
        client.destroy_sandbox(sb.id)


def test_inspect_shows_the_sandbox_range_and_no_mismatch(daemon, client):
    sb = client.create_sandbox()
    try:
        _, base, count = uid_map(client, sb.id)
        r = subprocess.run([sys.executable, "-m", "corral.runtime.cli", "inspect", sb.id,
                            "--json", "--socket", daemon.socket],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["mismatches"] == []
        maps = {tuple(p["uid_map"]) for p in out["report"]["processes"]}
        assert maps == {("0", str(base), str(count))}
    finally:
        client.destroy_sandbox(sb.id)
