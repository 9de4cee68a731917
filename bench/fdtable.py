"""Spawn cost against the caller's descriptor count: does a create grow with the fd table?

A daemon holds about two descriptors per idle sandbox (PID 1's pidfd and its status pipe),
so at N = 5,000 its table has some 10,000 entries. A clone that copies the table (and an
exec that walks it for close-on-exec) costs O(table); this bench measures that slope
directly, without piling up real sandboxes: it holds K extra descriptors in this process
(each /dev/null opened anew) and times, per K, round-robin within each iteration (the
starting K rotates), so that noise and drift hit every K alike:

  run      corral.sandbox.run(["/bin/true"]): a one-shot sandbox (PID 1 starts the command);
           bench/spawn.py's corral_run candidate
  sandbox  Sandbox(spec) + exec(["/bin/true"]) + wait() + destroy(): PID 1, then a command
           joined into it; bench/spawn.py's corral candidate

--place says where the K descriptors sit: `high` (the default) from the number the daemon
parks its per-sandbox descriptors at (corral.ext._spawn.PARK_BASE, 4096 where that is not
defined), `low` from the lowest free number, as a runtime that does not park them has them.

  bench/fdtable.py [--ks 0,2000,10000] [--iterations 100] [--warmup 5] [--place high|low]
                   [--spawn-ext SO]

--spawn-ext loads another build of the extension (the before side of an A/B: build the last
commit's ext/_spawn.pyx with `cythonize -i` in a scratch folder, link ext/corral-init
beside it, which is looked up next to the extension, and pass the .so).

Prints one JSON object: `<candidate>_ms_p50_k<K>` and `_p99_k<K>` for each K, and
`<candidate>_ratio_p50_k<max>_vs_k<min>` (the slope as a ratio: 1.0 is flat).
Times are milliseconds of time.perf_counter(); p99 is the nearest-rank percentile.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import statistics

import harness
import spawn


class Ballast:
    """K extra descriptors held open in this process, at the chosen place: each its own
    open file (as a daemon's pidfds and pipes are), so that a copy of the table takes a
    reference on K different files, not K on one."""

    def __init__(self, base: int) -> None:
        self._base = base
        self._fds: list[int] = []

    def hold(self, k: int) -> None:
        """Hold exactly k extra descriptors (opening or closing the difference)."""
        while len(self._fds) > k:
            os.close(self._fds.pop())
        while len(self._fds) < k:
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            if fd < self._base:
                fd, low = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, self._base), fd
                os.close(low)
            self._fds.append(fd)

    def close(self) -> None:
        self.hold(0)


def candidates() -> dict:
    """name -> a callable that runs one iteration and returns its milliseconds: bench/spawn.py's
    corral_run (one-shot run()) and corral (start + exec + wait + destroy)."""
    return {"run": spawn.CorralRunCandidate(), "sandbox": spawn.CorralCandidate()}


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            hard = need  # root may raise the hard limit too
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def load_spawn_ext(path: str) -> None:
    """Run with another build of corral.ext._spawn (e.g. the last commit's, for an A/B in
    one window); one without park_fd gets an identity park_fd for this checkout's backend."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("corral.ext._spawn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "park_fd"):
        module.park_fd = lambda fd: fd
    sys.modules["corral.ext._spawn"] = module
    import corral.ext

    corral.ext._spawn = module


def measure(ks: list[int], iterations: int, warmup: int, place: str) -> dict:
    from corral.ext import _spawn

    park = getattr(_spawn, "PARK_BASE", 4096)
    raise_nofile(park + max(ks) + 1024)
    ballast = Ballast(park if place == "high" else 3)
    runs = candidates()
    times: dict[tuple[str, int], list[float]] = {(n, k): [] for n in runs for k in ks}
    try:
        for i in range(warmup + iterations):
            order = ks[i % len(ks):] + ks[:i % len(ks)]
            for k in order:
                ballast.hold(k)
                for name, fn in runs.items():
                    ms = fn()
                    if i >= warmup:
                        times[(name, k)].append(ms)
    finally:
        ballast.close()
    out: dict = {"ks": ks, "iterations": iterations, "place": place, "park_base": park,
                 "spawn_ext": _spawn.__file__}
    for (name, k), values in times.items():
        out[f"{name}_ms_p50_k{k}"] = round(statistics.median(values), 3)
        out[f"{name}_ms_p99_k{k}"] = round(spawn.percentile(values, 99), 3)
    lo, hi = min(ks), max(ks)
    for name in runs:
        out[f"{name}_ratio_p50_k{hi}_vs_k{lo}"] = round(
            out[f"{name}_ms_p50_k{hi}"] / out[f"{name}_ms_p50_k{lo}"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="0,2000,10000",
                        help="descriptor counts to hold, comma-separated")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--place", choices=("high", "low"), default="high")
    parser.add_argument("--spawn-ext", metavar="SO",
                        help="another build of corral.ext._spawn to measure instead")
    args = parser.parse_args()
    harness.require_root("sandboxes need root here")
    if args.spawn_ext:
        load_spawn_ext(args.spawn_ext)
    ks = [int(k) for k in args.ks.split(",")]
    print(json.dumps(measure(ks, args.iterations, args.warmup, args.place)))


if __name__ == "__main__":
    main()
