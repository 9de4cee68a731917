"""The mixed run of bench/sessions.py (`--parts mixed`): real-time sessions while deep tasks
delegated by other sessions start, report progress and finish.

--mixed-pairs pairs of windows on the same daemon, the same N paced sessions (min(--sessions,
128), at --rate tokens/s), alone (the baseline) and while DelegationLoad keeps 32 delegated
tasks going, alternating alone, mixed, mixed, alone, ... (window_order), so that a drift of
the machine's load weighs on both kinds alike. In a mixed window two sessions of
bench/agents/mixed_delegator.py delegate 16 tasks each (the default
max_delegations_per_session), every task (bench/agents/mixed_task.py) reports PROGRESS every
100 ms for --mixed-task-steps steps and ends, and the next wave starts once a wave is done.

Keys (under "mixed"):
  delegate_to_running_ms_p50   the delegator's clock just before its DELEGATE -> the
                               session's watcher receiving the task's RUNNING update (local
                               executor), PROBES delegations one at a time before the windows;
                               target <= 30 ms. Its peer, submit_to_running_ms_p50, is
                               bench/scheduler.py's Submit -> runner start on the same daemon
                               (the sandbox's start dominates both). Under the load:
                               delegate_to_running_ms_p50_under_load
  mixed_latency_ms_p99         token latency p99 of the N sessions under the load, all its
                               windows' samples pooled; target within 10% of
                               baseline_latency_ms_p99, pooled alike (ratio reported;
                               windows_latency_ms_p99 has each window's own)
  update_latency_ms_p99        the task's PROGRESS stamp (its clock) -> the watcher receiving
                               the SessionEvent.task that carries it
All clocks are CLOCK_MONOTONIC of this machine (sandboxes share it).
"""

from __future__ import annotations

import json
import os
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = 32
#: Delegator sessions: TASKS / this many each, within max_delegations_per_session (16).
DELEGATORS = 2
#: Delegations timed one at a time for delegate_to_running_ms_p50.
PROBES = 10


def _percentile(values: list[int], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] / 1e6, 2)


def _node_cores(client) -> float:
    """The cores of the daemon's nodes, all together."""
    return sum(n.capacity.get("cpu", 0.0) for n in client.list_nodes()) or 1.0


class DelegationLoad:
    """Keeps TASKS delegated tasks going on a daemon, in waves, until stop(); times what the
    delegators' watchers receive."""

    def __init__(self, socket: str, steps: int, *, tasks: int = TASKS,
                 delegators: int = DELEGATORS, cpu: float = 0.0) -> None:
        from corral.runtime.client import Client

        self.client = Client.connect(socket=socket)
        self.steps = steps
        self.per_wave = tasks // delegators
        self.delegators = delegators
        #: cores each task holds: 0 shares the node's cores out among all the tasks
        self.cpu = cpu or round(_node_cores(self.client) / tasks, 4)
        self.running_ns: list[int] = []
        self.update_ns: list[int] = []
        self.tasks_done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sandboxes: list[str] = []

    def start(self) -> None:
        for _ in range(self.delegators):
            sandbox = self.client.create_sandbox(memory_bytes=256 << 20)
            self._sandboxes.append(sandbox.id)
            for name in ("mixed_delegator.py", "mixed_task.py"):
                with open(os.path.join(HERE, "agents", name), "rb") as f:
                    self.client.write_file(sandbox.id, name, f.read())
            stream = self.client.open_session(["python3", "mixed_delegator.py"],
                                              sandbox_id=sandbox.id)
            thread = threading.Thread(target=self._follow, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _follow(self, stream) -> None:
        """One delegator session: start a wave, time its news, start the next when done."""
        from corral.runtime.client import ClientError, decode_batch

        sent: dict[str, int] = {}  # ref -> delegator's clock before its DELEGATE
        running: set[str] = set()
        left, closing = 0, False
        try:
            for event in stream:
                now = time.monotonic_ns()
                kind = event.WhichOneof("event")
                if kind == "batch":
                    for line in "".join(decode_batch(event.batch).texts).splitlines():
                        if line.startswith("d "):
                            _, ref, ns = line.split()
                            sent[ref] = int(ns)
                        elif line.startswith("done "):
                            left -= 1
                            self.tasks_done += 1
                elif kind == "task":
                    self._timed(event.task, now, sent, running)
                if left > 0 or closing or kind not in ("batch", "turn_ended"):
                    continue
                if self._stop.is_set():  # between waves: end the delegator
                    closing = True
                    stream.close_session()
                else:
                    left = self.per_wave
                    stream.send_input(f"go {left} {self.steps} {self.cpu}")
        except ClientError as exc:
            self.errors.append(str(exc))

    def _timed(self, task, now: int, sent: dict, running: set) -> None:
        if task.event == "refused":
            self.errors.append(f"{task.code}: {task.message}")
        if task.event != "update":
            return
        if task.state == "RUNNING" and task.ref in sent and task.ref not in running:
            running.add(task.ref)
            self.running_ns.append(now - sent[task.ref])
        if task.progress_json:
            stamp = json.loads(task.progress_json).get("t")
            if stamp:
                self.update_ns.append(now - stamp)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        for sandbox_id in self._sandboxes:
            self.client.destroy_sandbox(sandbox_id)
        self.client.close()


def probe_delegate_to_running(socket: str, runs: int) -> list[int]:
    """Delegations one at a time on a daemon with nothing else to do (each task holds one
    core, as bench/scheduler.py's submit -> running does): ns from DELEGATE to RUNNING."""
    probe = DelegationLoad(socket, 1, tasks=1, delegators=1, cpu=1.0)
    probe.start()
    try:
        deadline = time.monotonic() + 60 + runs * 5
        while len(probe.running_ns) < runs and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        probe.stop()
    return probe.running_ns[:runs]


def window_order(pairs: int) -> list[str]:
    """alone, mixed, mixed, alone, alone, mixed, ...: each kind as often in the early as in
    the late part of the run, so that a drift of the machine's load over the run weighs on
    both alike."""
    order: list[str] = []
    for i in range(pairs):
        order += ["baseline", "mixed"] if i % 2 == 0 else ["mixed", "baseline"]
    return order


def run_mixed(daemon, agent_path: str, args, log, run_sessions) -> dict:
    """Delegate -> running alone (with Submit -> running as its peer), then --mixed-pairs
    pairs of windows on the same N sessions, alone and under DelegationLoad, alternating
    (window_order); each kind's token latencies are pooled for its p99. run_sessions is
    bench/sessions.py's (passed in: that module imports this one)."""
    import scheduler  # bench/scheduler.py: the Submit -> running peer

    from corral.runtime.client import Client

    n = min(args.sessions, 128)
    steps = getattr(args, "mixed_task_steps", 20)
    pairs = max(1, getattr(args, "mixed_pairs", 1))
    log("[mixed] delegate -> running, one at a time; Submit -> running as its peer")
    alone = probe_delegate_to_running(daemon.socket, PROBES)
    with Client.connect(socket=daemon.socket) as client:
        submit_ms = scheduler._submit_to_running(client, PROBES, resources={"cpu": 1})
    samples: dict[str, list[int]] = {"baseline": [], "mixed": []}
    runs: dict[str, list[dict]] = {"baseline": [], "mixed": []}
    windows: list[tuple[str, int, int]] = []
    running_ns: list[int] = []
    update_ns: list[int] = []
    tasks_done = 0
    errors: list[str] = []
    task_cpu = 0.0
    for kind in window_order(pairs):
        load = None
        if kind == "mixed":
            load = DelegationLoad(daemon.socket, steps)
            load.start()
            task_cpu = load.cpu
        log(f"[mixed] {n} sessions x {args.rate} tokens/s, {args.duration}s window, "
            + ("alone" if load is None else f"with {TASKS} delegated tasks going "
                                            f"({steps} x 100 ms each)"))
        began = time.monotonic_ns()
        try:
            res = run_sessions(daemon, agent_path, n, args, duration=args.duration,
                               interrupt_every_s=args.interrupt_every, workers=args.workers,
                               keep_samples=True)
        finally:
            if load is not None:
                load.stop()
        windows.append((kind, began, time.monotonic_ns()))
        samples[kind] += res.pop("latency_ns")
        runs[kind].append(res)
        if load is not None:
            running_ns += load.running_ns
            update_ns += load.update_ns
            tasks_done += load.tasks_done
            errors += load.errors
        log(f"[mixed]   token p99 {res['latency_ms_p99']} ms")
    baseline_p99 = _percentile(samples["baseline"], 99)
    mixed_p99 = _percentile(samples["mixed"], 99)
    out = {
        "sessions": min(r["sessions"] for r in runs["mixed"]),
        "delegated_tasks": TASKS,
        "delegate_to_running_ms_p50": _percentile(alone, 50),
        "delegate_to_running_ms_p99": _percentile(alone, 99),
        # the peer: Submit -> the runner's start (bench/scheduler.py's measure), same daemon
        "submit_to_running_ms_p50": round(sorted(submit_ms)[len(submit_ms) // 2], 2),
        "delegate_to_running_ms_p50_under_load": _percentile(running_ns, 50),
        # each kind's windows pooled: the p99 of all their samples together
        "mixed_latency_ms_p99": mixed_p99,
        "baseline_latency_ms_p99": baseline_p99,
        "mixed_vs_baseline_p99": (round(mixed_p99 / baseline_p99, 3)
                                  if mixed_p99 and baseline_p99 else None),
        "window_pairs": pairs,
        # each window's own p99, in the order run (window_order)
        "windows_latency_ms_p99": {k: [r["latency_ms_p99"] for r in v] for k, v in runs.items()},
        "samples": {k: len(v) for k, v in samples.items()},
        "update_latency_ms_p50": _percentile(update_ns, 50),
        "update_latency_ms_p99": _percentile(update_ns, 99),
        "tasks_started": len(running_ns),
        "tasks_finished": tasks_done,
        "progress_updates_timed": len(update_ns),
        "task_cpu_each": task_cpu,
        "daemon_cores_baseline": [r["daemon_cores"] for r in runs["baseline"]],
        "daemon_cores_mixed": [r["daemon_cores"] for r in runs["mixed"]],
        "loadavg": os.getloadavg()[0],
        # (kind, CLOCK_MONOTONIC ns at the start and end of its run_sessions call: set-up,
        # window and tear-down), in the order run
        "windows_ns": windows,
        "errors": errors[:5],
    }
    log(f"[mixed]   delegate->running p50 {out['delegate_to_running_ms_p50']} ms (submit "
        f"{out['submit_to_running_ms_p50']} ms), token p99 {mixed_p99} ms vs {baseline_p99} "
        f"ms alone ({pairs} pairs pooled), update p99 {out['update_latency_ms_p99']} ms")
    return out
