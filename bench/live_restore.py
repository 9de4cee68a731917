"""Live restore's cost on Create and on Exec's output: a daemon with live_restore on
against one with it off.

Starts two `corral daemon`s (root: they make sandboxes), one with `live_restore = true` in
its config, one without. Each round times, in rotating order, one Create on each at the
client over its unix socket; then, for the live restore one, how long after Create
returned its row was readable in restore.db (the holder's put and the fsync'd row run on a
thread of their own, off the Create: runtime/restore.py), polled outside the timed region.
Then, in the same rotating order, one Exec of `head -c EXEC_MIB MiB /dev/zero` read to its
end (a kept sandbox's command output goes through its journal on tmpfs: splice, header,
read-back per read; runtime/journal.py) and one `true` (Exec's round trip). Both sandboxes
are destroyed after each round.

  bench/live_restore.py [--iterations N] [--warmup N] [--quick] [--json]

Keys: kept_create_ms_p50/p99 (live restore on), plain_create_ms_p50/p99 (off),
ratio_kept_vs_plain_p50, kept_recorded_ms_p50/p99 (Create's return to its row on disk),
kept_exec_mib_s_p50/min and plain_exec_mib_s_p50/min (output throughput of one command),
kept_true_ms_p50/p99 and plain_true_ms_p50/p99 (a command's whole Exec).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time

import harness

SIZES = {
    "iterations": harness.Size(40, 4, "rounds of one Create on each daemon"),
    "warmup": harness.Size(3, 1, "rounds run first and not counted"),
    "exec_mib": harness.Size(64, 8, "MiB of output of the timed command"),
}
#: Longest wait for a row to reach restore.db before the bench gives up.
RECORD_WAIT_S = 30.0


def _p(values: list[float], pct: float) -> float:
    ranked = sorted(values)
    return round(ranked[max(0, -(-len(ranked) * pct // 100) - 1)], 3)


def _recorded_after(db_path: str, sandbox_id: str, returned: float) -> float:
    """Milliseconds from `returned` (perf_counter) until sandbox_id's row is readable."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            if db.execute("SELECT 1 FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone():
                return (time.perf_counter() - returned) * 1000
        time.sleep(0.0005)
    raise RuntimeError(f"sandbox {sandbox_id} was not recorded within {RECORD_WAIT_S}s")


def run(args: argparse.Namespace) -> dict:
    from corral.runtime.client import Client

    root = tempfile.mkdtemp(prefix="corral-bench-lr-")
    daemons = []
    try:
        kept_root, plain_root = os.path.join(root, "kept"), os.path.join(root, "plain")
        for path in (kept_root, plain_root):
            os.makedirs(path)
        config = os.path.join(kept_root, "corral.toml")
        with open(config, "w") as f:
            f.write("live_restore = true\n")
        kept_proc, kept_sock = harness.start_daemon(kept_root, "--config", config)
        daemons.append(kept_proc)
        plain_proc, plain_sock = harness.start_daemon(plain_root)
        daemons.append(plain_proc)
        db_path = os.path.join(kept_root, "state", "restore.db")
        kept, plain = Client.connect(socket=kept_sock), Client.connect(socket=plain_sock)
        times: dict[str, list[float]] = {"kept": [], "plain": [], "recorded": []}
        for i in range(args.warmup + args.iterations):
            order = [("kept", kept), ("plain", plain)]
            if i % 2:
                order.reverse()
            made = {}
            for name, client in order:
                t0 = time.perf_counter()
                made[name] = client.create_sandbox().id
                returned = time.perf_counter()
                if i >= args.warmup:
                    times[name].append((returned - t0) * 1000)
                if name == "kept":
                    recorded = _recorded_after(db_path, made[name], returned)
                    if i >= args.warmup:
                        times["recorded"].append(recorded)
            for name, client in order:
                mib_s, true_ms = _exec_round(client, made[name], args.exec_mib)
                if i >= args.warmup:
                    times.setdefault(f"{name}_exec", []).append(mib_s)
                    times.setdefault(f"{name}_true", []).append(true_ms)
            kept.destroy_sandbox(made["kept"])
            plain.destroy_sandbox(made["plain"])
        kept.close()
        plain.close()
    finally:
        for proc in daemons:
            harness.stop_daemon(proc)
        shutil.rmtree(root, ignore_errors=True)
    result = {}
    for name in ("kept", "plain"):
        result[f"{name}_create_ms_p50"] = _p(times[name], 50)
        result[f"{name}_create_ms_p99"] = _p(times[name], 99)
    result["ratio_kept_vs_plain_p50"] = round(
        result["kept_create_ms_p50"] / result["plain_create_ms_p50"], 3)
    result["kept_recorded_ms_p50"] = _p(times["recorded"], 50)
    result["kept_recorded_ms_p99"] = _p(times["recorded"], 99)
    for name in ("kept", "plain"):
        result[f"{name}_exec_mib_s_p50"] = _p(times[f"{name}_exec"], 50)
        result[f"{name}_exec_mib_s_min"] = round(min(times[f"{name}_exec"]), 3)
        result[f"{name}_true_ms_p50"] = _p(times[f"{name}_true"], 50)
        result[f"{name}_true_ms_p99"] = _p(times[f"{name}_true"], 99)
    return result


def _exec_round(client, sandbox_id: str, mib: int) -> tuple[float, float]:
    """(MiB/s of a command's output read to its end, ms of an Exec of `true`)."""
    t0 = time.perf_counter()
    got = 0
    for event in client.exec(sandbox_id, ["head", "-c", str(mib << 20), "/dev/zero"]):
        if event.WhichOneof("event") == "output":
            got += len(event.output.batch.text)
    elapsed = time.perf_counter() - t0
    if got != mib << 20:
        raise RuntimeError(f"the command's output was {got} bytes, not {mib << 20}")
    t0 = time.perf_counter()
    for _ in client.exec(sandbox_id, ["true"]):
        pass
    return mib / elapsed, (time.perf_counter() - t0) * 1000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_sizes(parser, SIZES)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    harness.apply_quick(args, SIZES)
    harness.require_root("the daemons make sandboxes")
    harness.emit(run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
