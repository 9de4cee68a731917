"""Sandboxes.Stats (issue 17): a stream of a sandbox's CPU, memory, pids, I/O and workspace
use, read from its cgroup and workspace, that ends when the sandbox is destroyed."""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import sys
import threading

import grpc
import pytest

from corral.runtime.client import ClientError

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20
# Writes 24 MiB to the workspace, holds 48 MiB of memory and burns CPU for a second,
# then sleeps: every figure has something to show.
BUSY = ("head -c 25165824 /dev/urandom > /workspace/blob && exec python3 -c '"
        "import time\nx = bytearray(48 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\n"
        "t = time.time()\nwhile time.time() - t < 1: pass\ntime.sleep(120)'")


def _refused(fn) -> grpc.StatusCode:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code


def test_stats_show_what_the_sandbox_uses_and_end_with_it(daemon):
    c = daemon.client(tenant=f"stats-{secrets.token_hex(3)}")
    sb = c.create_sandbox(memory_bytes=256 * MiB, pids_max=64)
    runner = threading.Thread(target=lambda: list(c.exec(sb.id, ["sh", "-c", BUSY])),
                              daemon=True)
    runner.start()
    samples = c.stats(sb.id, interval_s=0.2)
    seen = []
    for sample in samples:
        seen.append(sample)
        if (sample.memory_bytes >= 48 * MiB and sample.workspace_bytes >= 24 * MiB
                and sample.HasField("cpu_percent") and sample.cpu_usage_us >= 900_000):
            break
        assert len(seen) < 200, seen[-1]
    last = seen[-1]
    assert (last.memory_limit_bytes, last.pids_limit) == (256 * MiB, 64)
    assert 1 <= last.pids <= 3  # sh has exec'd python3 (plus the sandbox's PID 1)
    assert last.memory_peak_bytes >= last.memory_bytes
    assert last.io_write_bytes >= 0 and last.io_read_bytes >= 0
    assert last.workspace_bytes_max >= last.workspace_bytes
    assert last.oom_kills == 0
    # CPU time only grows; the busy second shows as a share of a core while it lasted
    usage = [s.cpu_usage_us for s in seen]
    assert usage == sorted(usage)
    assert max(s.cpu_percent for s in seen if s.HasField("cpu_percent")) > 20
    assert all(0 < s.time for s in seen) and [s.time for s in seen] == sorted(s.time for s in seen)

    # destroyed while a watcher streams: its stream ends, without an error
    ended = threading.Event()

    def watch():
        for _ in c.stats(sb.id, interval_s=0.1):
            pass
        ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    c.destroy_sandbox(sb.id)
    watcher.join(30)
    assert ended.is_set()
    runner.join(30)
    samples.close()


def test_stats_refusals_are_exact(daemon):
    c = daemon.client(tenant=f"stats-{secrets.token_hex(3)}")
    other = daemon.client(tenant=f"stats-{secrets.token_hex(3)}")
    sb = c.create_sandbox()
    try:
        for interval in (0.01, -1, 3601, math.nan, math.inf):
            assert _refused(lambda i=interval: next(c.stats(sb.id, i))) == \
                grpc.StatusCode.INVALID_ARGUMENT, interval
        assert _refused(lambda: next(c.stats("sbx-000000000000"))) == grpc.StatusCode.NOT_FOUND
        # another tenant's sandbox is unknown to it, as for every call
        assert _refused(lambda: next(other.stats(sb.id))) == grpc.StatusCode.NOT_FOUND
    finally:
        c.destroy_sandbox(sb.id)


def test_corral_stats_prints_one_sample(daemon):
    tenant = f"stats-{secrets.token_hex(3)}"
    c = daemon.client(tenant=tenant)
    sb = c.create_sandbox(memory_bytes=128 * MiB)
    try:
        env = dict(os.environ, CORRAL_SOCKET=daemon.socket)

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "corral.runtime.cli", "stats",
                                   "--tenant", tenant, *args],
                                  env=env, capture_output=True, text=True, timeout=60)

        out = cli(sb.id, "--no-stream", "--json", "--interval", "0.2s")
        assert out.returncode == 0, out.stderr
        [line] = out.stdout.splitlines()
        sample = json.loads(line)
        assert int(sample["memory_limit_bytes"]) == 128 * MiB
        assert "cpu_percent" in sample  # --no-stream waits for a second sample for CPU
        table = cli(sb.id, "--no-stream", "--interval", "0.2s")
        assert table.returncode == 0, table.stderr
        head, row = table.stdout.splitlines()
        assert head.split()[:2] == ["CPU", "%"] and "/ 128.0MiB" in row
        bad = cli(sb.id, "--interval", "5ms")
        assert bad.returncode == 2 and "interval_s" in bad.stderr
        gone = cli("sbx-000000000000", "--no-stream")
        assert gone.returncode == 1 and "does not exist" in gone.stderr
    finally:
        c.destroy_sandbox(sb.id)
