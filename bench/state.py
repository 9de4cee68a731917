"""Sandbox state: snapshot capture, fork from a snapshot, and the diff of a copy-on-write
workspace, through the native backend (sandbox/state), from one warm Python process.

  snapshot_ms_p50_100mb   Sandbox.snapshot() of a sandbox whose workspace holds 100 MiB in
                          100 files (freeze, copy, thaw, sync, commit); the sandbox runs on
  fork_ms_p50             Sandbox(SandboxSpec(snapshot=...)).start() + exec(["/bin/true"]) +
                          wait(), from that 100 MiB snapshot: "create to first exec"
  fork_small_ms_p50       the same from a snapshot of one small file (fork cost must not
                          depend on the state's size)
  create_ms_p50           the same for a plain Sandbox(SandboxSpec()): the peer
  fork_ms_p50_vs_create   fork_ms_p50 / create_ms_p50 (target: <= 1.5)
  diff_ms_p50_10k_files   diff() of a copy-on-write workspace whose sandbox rewrote every
                          one of 10,000 files of its host directory (line counts, no patch)
  pause_ms_p50/_p99       Sandbox.pause() (the cgroup freezer, returned once FROZEN) of a
  resume_ms_p50/_p99      sandbox with --busy-processes spinning, and resume() (target: each
                          <= 5 ms; E2B publishes ~4 s per GiB to pause, ~1 s to resume)

Forks and plain creates run round-robin (the first rotates) so that noise and drift hit both;
destroy is outside the timed part. Times are milliseconds of time.perf_counter().

  bench/state.py [--iterations N] [--fork-iterations N] [--snapshot-mb N] [--diff-files N]
                 [--quick] [--json]
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import harness

SIZES = {
    "iterations": harness.Size(15, 2, "timed snapshots and diffs"),
    "fork_iterations": harness.Size(40, 2, "timed rounds of fork / small fork / create"),
    "snapshot_mb": harness.Size(100, 4, "MiB of files in the snapshotted workspace"),
    "diff_files": harness.Size(10_000, 200, "files the copy-on-write sandbox rewrites"),
    "busy_processes": harness.Size(4, 2, "processes spinning in the sandbox that is paused"),
}


def _ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def _ms_p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)


def _true(sandbox) -> None:
    proc = sandbox.exec(["/bin/true"], stdin=None, stdout=None, stderr=None)
    if proc.wait() != 0:
        raise RuntimeError("/bin/true failed in the sandbox")


def _fill(sandbox, megabytes: int) -> None:
    """megabytes files of 1 MiB of random data in the sandbox's workspace."""
    proc = sandbox.exec(["/bin/sh", "-c", f"i=0; while [ $i -lt {megabytes} ]; do head -c 1M "
                         f"/dev/urandom > f$i; i=$((i+1)); done"])
    proc.communicate()


def measure_snapshots(store, iterations: int, megabytes: int):
    """(snapshot samples, the big snapshot, a small snapshot)."""
    from corral.sandbox import Sandbox, SandboxSpec

    samples = []
    with Sandbox(SandboxSpec()) as small:
        small.exec(["/bin/sh", "-c", "echo small > f"]).communicate()
        small_snap = small.snapshot(store)
    with Sandbox(SandboxSpec()) as sb:
        _fill(sb, megabytes)
        big = sb.snapshot(store)  # the layer is stored once; later copies are dropped
        for _ in range(iterations):
            gc.collect()
            start = time.perf_counter()
            snap = sb.snapshot(store)
            samples.append(time.perf_counter() - start)
            store.remove(snap.id)
    return samples, big, small_snap


def measure_forks(store, iterations: int, big, small) -> dict[str, list[float]]:
    """Round-robin: fork of the big snapshot, fork of the small one, plain create."""
    from corral.sandbox import Sandbox, SandboxSpec

    kinds = {"fork": SandboxSpec(snapshot=big.id), "fork_small": SandboxSpec(snapshot=small.id),
             "create": SandboxSpec()}
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for i in range(iterations + 1):  # the first round warms up
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            gc.collect()
            sandbox = Sandbox(kinds[name], snapshot_store=store)
            start = time.perf_counter()
            sandbox.start()
            _true(sandbox)
            took = time.perf_counter() - start
            sandbox.destroy()
            if i:
                samples[name].append(took)
    return samples


def measure_diff(root: str, iterations: int, files: int) -> list[float]:
    """diff() of a change set whose sandbox rewrote every file of its host directory."""
    from corral.sandbox import Sandbox, SandboxSpec
    from corral.sandbox.state.changes import ChangeSet
    from corral.sandbox.state.diff import diff

    host = os.path.join(root, "project")
    os.mkdir(host)
    for i in range(files):
        sub = os.path.join(host, f"d{i // 500}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i}.txt"), "w") as f:
            f.write(f"line one of {i}\nline two\n")
    changes_root = os.path.join(root, "changes")
    with Sandbox(SandboxSpec(workspace=host, workspace_cow=True),
                 changes_root=changes_root) as sb:
        sb.exec(["/bin/sh", "-c", "for f in d*/*.txt; do echo changed >> $f; done"]
                ).communicate()
        sandbox_id = sb.id
    changes = ChangeSet.open(changes_root, sandbox_id)
    samples = []
    try:
        for _ in range(iterations):
            gc.collect()
            start = time.perf_counter()
            found = diff(changes)
            samples.append(time.perf_counter() - start)
            if len(found) != files:
                raise RuntimeError(f"diff found {len(found)} changes, not {files}")
    finally:
        changes.discard()
    return samples


def measure_pause(iterations: int, busy: int) -> tuple[list[float], list[float]]:
    """Sandbox.pause() and resume() of a sandbox whose `busy` processes spin on the CPU: the
    freezer must stop every one of them (pause returns once the kernel says FROZEN)."""
    from corral.sandbox import SandboxSpec
    from corral.sandbox.backends.native import Sandbox

    pauses: list[float] = []
    resumes: list[float] = []
    with Sandbox(SandboxSpec(cpus=None)) as sandbox:
        spinners = [sandbox.exec(["/bin/sh", "-c", "while :; do :; done"], stdin=None,
                                 stdout=None, stderr=None) for _ in range(busy)]
        time.sleep(0.2)
        for _ in range(iterations):
            t0 = time.perf_counter()
            sandbox.pause()
            t1 = time.perf_counter()
            sandbox.resume()
            t2 = time.perf_counter()
            pauses.append(t1 - t0)
            resumes.append(t2 - t1)
            time.sleep(0.01)  # let the spinners run between rounds
        for proc in spinners:
            proc.kill()
    return pauses, resumes


def main(argv: list[str] | None = None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], SIZES, argv)
    harness.require_root("snapshots and forks mount overlays of idmapped layers")
    from corral.sandbox.state.snapshots import SnapshotStore

    root = tempfile.mkdtemp(prefix="corral-bench-state-")
    try:
        store = SnapshotStore(os.path.join(root, "snapshots"))
        snaps, big, small = measure_snapshots(store, args.iterations, args.snapshot_mb)
        forks = measure_forks(store, args.fork_iterations, big, small)
        diffs = measure_diff(root, args.iterations, args.diff_files)
        pauses, resumes = measure_pause(args.iterations * 4, args.busy_processes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fork, create = _ms(forks["fork"]), _ms(forks["create"])
    harness.emit({
        f"snapshot_ms_p50_{args.snapshot_mb}mb": _ms(snaps),
        "fork_ms_p50": fork,
        "fork_small_ms_p50": _ms(forks["fork_small"]),
        "create_ms_p50": create,
        "fork_ms_p50_vs_create": round(fork / create, 3),
        "pause_ms_p50": _ms(pauses),
        "pause_ms_p99": _ms_p99(pauses),
        "resume_ms_p50": _ms(resumes),
        "resume_ms_p99": _ms_p99(resumes),
        "busy_processes": args.busy_processes,
        f"diff_ms_p50_{args.diff_files // 1000}k_files" if args.diff_files >= 1000
        else f"diff_ms_p50_{args.diff_files}_files": _ms(diffs),
        "iterations": args.iterations,
        "fork_iterations": args.fork_iterations,
        "python": sys.version.split()[0],
    }, args.json)


if __name__ == "__main__":
    main()
