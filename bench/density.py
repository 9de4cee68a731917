"""Density: what one idle sandbox costs the daemon, and how many fit under its descriptors.

Starts a real `corral daemon` under a lowered RLIMIT_NOFILE (`prlimit --nofile=N:N`, so the
run stays short: the daemon can raise its soft limit only up to that hard limit), then:

  fds_per_idle_sandbox     descriptors the daemon holds per idle sandbox: /proc/PID/fd
                           after --sample creates, minus before, divided by --sample
  rss_per_idle_sandbox     the daemon's RSS growth per idle sandbox (bytes), same sample,
                           plus init_rss_per_sandbox and init_pss_per_sandbox: PID 1
                           (corral-init) of one sandbox, outside the daemon
  max_idle_sandboxes       Create until the daemon refuses: how many were alive then, and
                           how the first refusal was answered (refused_with: the gRPC status;
                           RESOURCE_EXHAUSTED is the descriptor budget refusing cleanly,
                           INTERNAL would be the kernel's EMFILE reaching a caller)
  exec_after_refusal       an exec in an existing sandbox still works at the limit (the
                           daemon's own descriptor reserve)
  max_idle_sandboxes_at_1m_fds    the same budget projected to RLIMIT_NOFILE = 1,048,576
                           (max_sandboxes, 512 by default, caps it sooner)

  bench/density.py [--nofile N] [--sample N]

With --scale 10,100,1000,5000 (issue 16) it instead piles up idle sandboxes under the
daemon's own limits and reports, at each count, create_ms_p50_at_n (one more create and its
destroy), list_ms_p50_at_n (one List call: a page of 100) and list_all_ms_at_n (every
page), also as one JSON line on stderr per count, then idle_sandboxes,
host_mib_per_idle_sandbox (MemTotal - MemAvailable, delta / N), slab_mib_per_idle_sandbox
(the kernel's Slab, delta / N), daemon_mib_per_sandbox, daemon_fds_per_sandbox and the
ratios of the last count to the first; superblocks (those one sandbox made, by fstype) and
empty_memcg_kib_before / _at_n (the slab one new empty memory cgroup takes: mostly its
shrinker table, sized by the most superblocks the kernel has held at once since boot).

Prints one JSON object on the last line. Needs root (sandboxes, cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import harness

from corral.runtime.client import Client, ClientError
from corral.sandbox import mounts


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (corral-init's text) split among their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def daemon_pid(proc: subprocess.Popen) -> int:
    """prlimit execs the daemon, so the child's pid is the daemon's."""
    return proc.pid


def _answering(client, within_s: float = 30.0):
    """client, once the daemon answers (its socket exists before its server does)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            client.list_sandboxes_page(page_size=1)
            return client
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure(nofile: int, sample: int) -> dict:
    root = tempfile.mkdtemp(prefix="corral-density-")
    proc, socket = harness.start_daemon(
        root, "--max-sandboxes", "100000", "--workspace-size", "16M",
        wrapper=("prlimit", f"--nofile={nofile}:{nofile}", "--"))
    pid = daemon_pid(proc)
    client = None
    try:
        client = _answering(Client.connect(socket=socket))
        # warm: the first create loads profiles and starts the spawner threads
        first = client.create_sandbox(memory_bytes=64 << 20)
        time.sleep(0.2)
        fds0, rss0 = fd_count(pid), rss_bytes(pid)
        ids = [first.id]
        for _ in range(sample):
            ids.append(client.create_sandbox(memory_bytes=64 << 20).id)
        time.sleep(0.2)
        fds1, rss1 = fd_count(pid), rss_bytes(pid)
        init_pid = client.get_sandbox(ids[-1]).init_pid
        init_rss, init_pss = rss_bytes(init_pid), pss_bytes(init_pid)
        refused_with, refused_message = "", ""
        started = time.monotonic()
        while True:
            try:
                ids.append(client.create_sandbox(memory_bytes=64 << 20).id)
            except ClientError as exc:
                refused_with, refused_message = exc.code.name, str(exc)
                break
        fill_s = time.monotonic() - started
        alive = len(ids)
        exec_ok = False
        try:
            events = list(client.exec(ids[0], ["true"]))
            exec_ok = any(e.HasField("exited") and e.exited.returncode == 0 for e in events)
        except ClientError as exc:
            exec_ok = f"{exc.code.name}"
        per_fd = (fds1 - fds0) / sample
        for sandbox_id in ids:
            try:
                client.destroy_sandbox(sandbox_id)
            except ClientError:
                pass
        return {
            "nofile": nofile,
            "fds_per_idle_sandbox": round(per_fd, 2),
            "rss_per_idle_sandbox": round((rss1 - rss0) / sample),
            "init_rss_per_sandbox": init_rss,
            "max_idle_sandboxes": alive,
            # the same budget at RLIMIT_NOFILE = 2**20: what the daemon holds, its reserve
            # (256 at that limit) and one create's headroom, the rest at this cost each
            "max_idle_sandboxes_at_1m_fds": int(((1 << 20) - fds0 - 256 - 12) / per_fd) + 1
            if per_fd else None,
            "init_pss_per_sandbox": init_pss,
            "refused_with": refused_with,
            "refused_message": refused_message,
            "exec_after_refusal": exec_ok,
            "daemon_fds_after_destroy": fd_count(pid) if proc.poll() is None else None,
            "fill_s": round(fill_s, 2),
        }
    finally:
        if client is not None:
            client.close()
        harness.stop_daemon(proc)
        shutil.rmtree(root, ignore_errors=True)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    return info


def _slab_caches() -> dict[str, tuple[int, int]]:
    """/proc/slabinfo: each cache's (objects allocated, bytes they take)."""
    caches = {}
    with open("/proc/slabinfo") as f:
        for line in f.readlines()[2:]:
            fields = line.split()
            caches[fields[0]] = (int(fields[2]), int(fields[2]) * int(fields[3]))
    return caches


def _kernel_growth(before: tuple, after: tuple, n: int, top: int = 25) -> dict:
    """Per sandbox between two counts n apart: meminfo's kernel lines and the slab caches
    that grew most (objects and bytes per sandbox)."""
    (info0, slab0), (info1, slab1) = before, after
    out = {key: round((info1[key] - info0[key]) / n) for key in
           ("Slab", "SUnreclaim", "SReclaimable", "Percpu", "KernelStack", "PageTables")
           if key in info1}
    grown = sorted(((slab1[name][1] - slab0.get(name, (0, 0))[1], name) for name in slab1),
                   reverse=True)[:top]
    out["caches"] = {name: {"objs": round((slab1[name][0] - slab0.get(name, (0, 0))[0]) / n, 2),
                            "bytes": round(grown_bytes / n)}
                     for grown_bytes, name in grown}
    return out


def _used_bytes() -> int:
    """The host's used memory: MemTotal - MemAvailable (page cache that can go is not used)."""
    info = _meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def _total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _p50_ms(fn, times: int) -> float:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return round(sorted(samples)[len(samples) // 2], 3)


def _grow(client, ids: list[str], n: int, budget: int) -> str:
    """Create idle sandboxes up to n; "" when there, else why it stopped short."""
    while len(ids) < n:
        if len(ids) % 100 == 0 and _used_bytes() > budget:
            return "memory: 60% of RAM used"
        try:
            ids.append(client.create_sandbox(memory_bytes=64 << 20).id)
        except ClientError as exc:
            return f"{exc.code.name}: {exc}"
    return ""


def sandbox_superblocks(init_pid: int) -> dict:
    """The superblocks one sandbox made, from its PID 1's mount table: by fstype (its
    workspace is one of the tmpfs), plus its IPC namespace's mqueue, which no table shows."""
    with open(f"/proc/{init_pid}/mountinfo") as f:
        own = mounts.own_superblocks(f.read())
    by_type: dict[str, int] = {}
    for fstype, *_ in own.values():
        by_type[fstype] = by_type.get(fstype, 0) + 1
    by_type["mqueue (its IPC namespace's, not mounted)"] = 1
    return {"by_fstype": by_type, "per_sandbox": sum(by_type.values())}


def empty_memcg_kib(count: int = 32) -> float | None:
    """Slab one new, empty memory cgroup takes (KiB): mostly its shrinker table, whose size
    follows the most memcg-aware shrinkers (superblocks) the kernel has held at once since
    boot. None where no memory cgroup can be made here."""
    for parent in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(parent, "memory.usage_in_bytes" if parent.endswith(
                "memory") else "cgroup.subtree_control")):
            break
    else:
        return None
    base = os.path.join(parent, f"corral-density-{os.getpid()}")
    made = []
    try:
        os.mkdir(base)
        time.sleep(0.2)
        before = _meminfo()["Slab"]
        for i in range(count):
            os.mkdir(os.path.join(base, str(i)))
            made.append(os.path.join(base, str(i)))
        time.sleep(0.2)
        return round((_meminfo()["Slab"] - before) / count / 1024, 1)
    except OSError:
        return None
    finally:
        for path in [*made, base]:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _create_once(client) -> None:
    client.destroy_sandbox(client.create_sandbox(memory_bytes=64 << 20).id)


def scale(points: list[int], samples: int, kernel_detail: bool = False,
          daemon_args: tuple[str, ...] = ()) -> dict:
    """Create and List latency as idle sandboxes pile up, and their memory cost.

    The daemon takes its hard RLIMIT_NOFILE (an idle sandbox holds 2 descriptors there);
    creation stops at the last point, when the host's used memory would pass 60% of RAM,
    or at the daemon's first refusal (idle_sandboxes then says how many, refused_with why).
    With kernel_detail, kernel_growth_per_sandbox says which kernel objects grew, per
    sandbox, between the last two counts.
    """
    root = tempfile.mkdtemp(prefix="corral-density-")
    proc, socket = harness.start_daemon(root, "--max-sandboxes", "100000",
                                        "--workspace-size", "16M", *daemon_args)
    pid = daemon_pid(proc)
    client = Client.connect(socket=socket)
    ids: list[str] = []
    out: dict = {"create_ms_p50_at_n": {}, "list_ms_p50_at_n": {}}
    try:
        _answering(client)
        _create_once(client)  # warm: profiles loaded, spawner threads started
        out["empty_memcg_kib_before"] = empty_memcg_kib()
        used0, rss0, slab0 = _used_bytes(), rss_bytes(pid), _meminfo()["Slab"]
        budget = int(_total_bytes() * 0.6)
        snapshots = []
        for n in points:
            out["stopped_by"] = _grow(client, ids, n, budget)
            if out["stopped_by"]:
                break
            if kernel_detail:
                time.sleep(1.0)  # RCU-freed objects of the last creates settle
                snapshots.append((len(ids), (_meminfo(), _slab_caches())))
            out["create_ms_p50_at_n"][n] = _p50_ms(lambda: _create_once(client), samples)
            # one List call (a page of 100), as a platform polls it; every page of 5,000
            # is 50 calls by design, so list_all_ms_at_n is given beside it
            out["list_ms_p50_at_n"][n] = _p50_ms(client.list_sandboxes_page, samples)
            out.setdefault("list_all_ms_at_n", {})[n] = _p50_ms(client.list_sandboxes, 3)
            # one line per count on stderr: a run cut short still says how far it got
            print(json.dumps({key: out[key][n] for key in (
                "create_ms_p50_at_n", "list_ms_p50_at_n", "list_all_ms_at_n")} | {"n": n}),
                file=sys.stderr, flush=True)
        if len(snapshots) >= 2:
            (n0, before), (n1, after) = snapshots[-2:]
            out["kernel_growth_per_sandbox"] = _kernel_growth(before, after, n1 - n0)
        n = len(ids)
        time.sleep(1.0)
        out["idle_sandboxes"] = n
        if ids:
            out["superblocks"] = sandbox_superblocks(client.get_sandbox(ids[0]).init_pid)
        out["host_mib_per_idle_sandbox"] = round((_used_bytes() - used0) / n / 2**20, 3)
        # most of it: kernel objects (namespaces, mounts, cgroups, superblocks' shrinkers)
        out["slab_mib_per_idle_sandbox"] = round((_meminfo()["Slab"] - slab0) / n / 2**20, 3)
        out["daemon_mib_per_sandbox"] = round((rss_bytes(pid) - rss0) / n / 2**20, 4)
        out["daemon_fds_per_sandbox"] = round(fd_count(pid) / n, 2)
        first, last = min(out["create_ms_p50_at_n"]), max(out["create_ms_p50_at_n"])
        out["ratio_create_at_n_vs_first"] = round(
            out["create_ms_p50_at_n"][last] / out["create_ms_p50_at_n"][first], 3)
        out["ratio_list_at_n_vs_first"] = round(
            out["list_ms_p50_at_n"][last] / out["list_ms_p50_at_n"][first], 3)
        out["empty_memcg_kib_at_n"] = empty_memcg_kib()
        return out
    finally:
        for sandbox_id in ids:
            try:
                client.destroy_sandbox(sandbox_id)
            except ClientError:
                pass
        client.close()
        harness.stop_daemon(proc)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nofile", type=int, default=1024,
                        help="RLIMIT_NOFILE (soft = hard) of the daemon (default: 1024)")
    parser.add_argument("--sample", type=int, default=50,
                        help="idle sandboxes the per-sandbox figures are measured over")
    parser.add_argument("--scale", metavar="N,N,...",
                        help="instead: create and List latency and memory per idle sandbox "
                             "at these counts (issue 16: 10,100,1000,5000)")
    parser.add_argument("--kernel-detail", action="store_true",
                        help="with --scale: the kernel objects (slab caches, meminfo) grown "
                             "per sandbox between the last two counts")
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="with --scale: an extra `corral daemon` argument, e.g. "
                             "--daemon-arg=--cgroup-pool-size=4 (repeatable)")
    args = parser.parse_args()
    if args.scale:
        points = sorted(int(p) for p in args.scale.split(","))
        result = scale(points, max(8, args.sample // 2), args.kernel_detail,
                       tuple(args.daemon_arg))
        result["daemon_args"] = args.daemon_arg
        print(json.dumps(result, sort_keys=True))
        return 0
    result = measure(args.nofile, args.sample)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["refused_with"] == "RESOURCE_EXHAUSTED" else 1


if __name__ == "__main__":
    sys.exit(main())
