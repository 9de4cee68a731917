"""The mixed run of bench/sessions.py (`--parts mixed`): real-time sessions while deep tasks
delegated by other sessions start, report progress and finish.

Two windows on the same daemon, the same N paced sessions (min(--sessions, 128), at --rate
tokens/s): first alone (the baseline), then while DelegationLoad keeps 32 delegated tasks
going: two sessions of bench/agents/mixed_delegator.py delegate 16 each (the default
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
  mixed_latency_ms_p99         token latency p99 of the N sessions under the load; target
                               within 10% of baseline_latency_ms_p99 (ratio reported)
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


def run_mixed(daemon, agent_path: str, args, log, run_sessions) -> dict:
    """Delegate -> running alone (with Submit -> running as its peer), then the baseline
    window, then the same under DelegationLoad; run_sessions is bench/sessions.py's (passed
    in: that module imports this one)."""
    import scheduler  # bench/scheduler.py: the Submit -> running peer

    from corral.runtime.client import Client

    n = min(args.sessions, 128)
    steps = getattr(args, "mixed_task_steps", 20)
    log("[mixed] delegate -> running, one at a time; Submit -> running as its peer")
    alone = probe_delegate_to_running(daemon.socket, PROBES)
    with Client.connect(socket=daemon.socket) as client:
        submit_ms = scheduler._submit_to_running(client, PROBES, resources={"cpu": 1})
    log(f"[mixed] {n} sessions x {args.rate} tokens/s alone, {args.duration}s window")
    windows = {"baseline": [time.monotonic_ns()]}
    base = run_sessions(daemon, agent_path, n, args, duration=args.duration,
                        interrupt_every_s=args.interrupt_every, workers=args.workers)
    windows["baseline"].append(time.monotonic_ns())
    load = DelegationLoad(daemon.socket, steps)
    load.start()
    try:
        log(f"[mixed] again, with {TASKS} delegated tasks going ({steps} x 100 ms each)")
        windows["mixed"] = [time.monotonic_ns()]
        mixed = run_sessions(daemon, agent_path, n, args, duration=args.duration,
                             interrupt_every_s=args.interrupt_every, workers=args.workers)
        windows["mixed"].append(time.monotonic_ns())
    finally:
        load.stop()
    baseline_p99, mixed_p99 = base["latency_ms_p99"], mixed["latency_ms_p99"]
    out = {
        "sessions": mixed["sessions"],
        "delegated_tasks": TASKS,
        "delegate_to_running_ms_p50": _percentile(alone, 50),
        "delegate_to_running_ms_p99": _percentile(alone, 99),
        # the peer: Submit -> the runner's start (bench/scheduler.py's measure), same daemon
        "submit_to_running_ms_p50": round(sorted(submit_ms)[len(submit_ms) // 2], 2),
        "delegate_to_running_ms_p50_under_load": _percentile(load.running_ns, 50),
        "mixed_latency_ms_p99": mixed_p99,
        "baseline_latency_ms_p99": baseline_p99,
        "mixed_vs_baseline_p99": (round(mixed_p99 / baseline_p99, 3)
                                  if mixed_p99 and baseline_p99 else None),
        "update_latency_ms_p50": _percentile(load.update_ns, 50),
        "update_latency_ms_p99": _percentile(load.update_ns, 99),
        "tasks_started": len(load.running_ns),
        "tasks_finished": load.tasks_done,
        "progress_updates_timed": len(load.update_ns),
        "task_cpu_each": load.cpu,
        "daemon_cores_baseline": base["daemon_cores"],
        "daemon_cores_mixed": mixed["daemon_cores"],
        "loadavg": os.getloadavg()[0],
        # CLOCK_MONOTONIC ns of each run_sessions call (set-up, window and tear-down)
        "windows_ns": windows,
        "errors": load.errors[:5],
    }
    log(f"[mixed]   delegate->running p50 {out['delegate_to_running_ms_p50']} ms (submit "
        f"{out['submit_to_running_ms_p50']} ms), token p99 {mixed_p99} ms vs {baseline_p99} "
        f"ms alone, update p99 {out['update_latency_ms_p99']} ms")
    return out
