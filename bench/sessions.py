"""Sessions end to end: agent in a real sandbox -> `corral daemon` -> gRPC client on the socket.

Everything runs on this machine at once (daemon, agents, clients share its CPUs), against a
daemon this script starts (fresh state dir, private socket) and stops. The agent is
bench/agents/bench_agent.c, compiled here with gcc and uploaded into each sandbox.

single       one session; the agent writes 4-byte TOKEN frames as fast as it can (1 MiB
             writes of pre-encoded frames). Tokens/s at the client: tokens after the first
             batch / (last batch received - first batch received). The project's synchronous
             `corral.runtime.client.Client`. Median of --repeats runs. Target >= 1,000,000.
             The agent writes faster than one Python client reads (15-30 M tokens/s), so the
             session's 8 MiB replay log evicts what the client has not read yet: those are
             `tokens_lost` (the batches say so), as designed; the rate counts received ones.
sessions     N concurrent sessions (one sandbox each), each agent paced at --rate tokens/s in
             bursts every --burst-ms (one write() per burst; its first token is "@" + the
             CLOCK_MONOTONIC ns of the write, in hex). Token latency = client receive time -
             that stamp, per burst, for bursts received inside the measurement window (after
             every session is open and --warmup has passed). Target: N = 256, p99 <= 20 ms.
             Clients: --workers processes (grpc.aio, one channel each), sessions dealt round-
             robin, so one Python client is not the limit (the client is not under test, but
             it shares the CPUs: its CPU use is reported).
interrupt    during the same window every session sends an interrupt at random moments
             (mean --interrupt-every s apart, one outstanding at a time); the agent answers
             TURN_END {"read_ns"} with the CLOCK_MONOTONIC time it read INTERRUPT; latency =
             read_ns - the client's clock just before `call.write()`. Then the client sends an
             input (starting the next turn): the agent answers PROGRESS {"input_read_ns"},
             reported as input latency. Target interrupt p99 <= 5 ms. The same is measured on
             one session alone (`interrupt_idle`).
sweep        with the full run, the largest N (multiple of --sweep-step) that meets the token
             latency target, by bisection below --sessions when N = --sessions misses it.

All of it twice: the daemon as built (compiled token core) and with CORRAL_STREAM_IMPL=python
(the pure-Python twin), under `python_twin`, with ratios.

CPU: the daemon's utime+stime from /proc/PID/stat over each window (cores = CPU s / wall s),
split by thread (/proc/PID/task/*/stat); its loop thread's time on a CPU and waiting for one
(/proc/PID/schedstat) and its context switches; every process's CPU over the window grouped
(daemon, bench clients, bench_agent, "other: NAME" for anything else running); the clients'
own CPU (getrusage); the whole machine's busy time (/proc/stat); and CPU per batch message,
the figure to compare A/B runs by on a machine with other load (latency moves far more).
The clients' own cyclic GC over the window (`client_gc`): collections and pauses per
generation, and how many interrupts (of those over 5 ms) a client sent while it collected.

    python bench/sessions.py                # readable summary
    python bench/sessions.py --json         # one JSON object on stdout
    python bench/sessions.py --quick        # smoke run: N = 32, short windows, no sweep
    python bench/sessions.py --sessions 128 --workers 4 --duration 10 --no-sweep --no-twin
    python bench/sessions.py --py-spy out.txt   # + py-spy the daemon over the N-session window
    python bench/sessions.py --parts single,idle  # only some parts (single, idle, sessions,
                                                  # and mixed: delegated tasks, bench/_mixed.py)

`--daemon-package corral.runtime=DIR` runs the daemon with that package imported from DIR (a
patched copy, for A/B runs of a prototype; repeatable); `--daemon-env K=V` adds to the daemon's
environment (`CORRAL_BENCH_UVLOOP=1` installs uvloop first, if importable;
`CORRAL_BENCH_LOOP_LAG_LOG=FILE` appends each late run (over 2 ms) of a 1 ms timer on the
daemon's loop there: when, how late, and the loop thread's CPU time and run-queue wait
meanwhile (ns).
`CORRAL_BENCH_SLOW_TOKENS=FILE` (in the bench's own environment: its client workers read it)
appends each token received over 20 ms late: when, and how late (ns).
`CORRAL_BENCH_GC_LOG=FILE` writes the daemon's cyclic-GC pauses per generation there at exit;
`CORRAL_BENCH_GC_FREEZE=1` freezes what the imports made). `--daemon-arg=--mux-interval-ms=0`
passes a flag to `corral daemon`; `--api open` uses one Sessions.Open stream per session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT_SOURCE = os.path.join(HERE, "agents", "bench_agent.c")
CLK_TCK = os.sysconf("SC_CLK_TCK")
STAMP = re.compile(rb"@([0-9a-f]{16})")

TARGETS = {
    "single_session_tokens_per_s": ">= 1,000,000",
    "sessions": "256 concurrent sessions at 1,000 tokens/s each",
    "latency_ms_p99": "<= 20 ms (at N = 256)",
    "interrupt_ms_p99": "<= 5 ms",
}

# Runs the daemon's CLI. CORRAL_BENCH_PACKAGES="corral.runtime=DIR,corral.sandbox=DIR" imports
# those packages from other folders (patched copies, for A/B runs of a prototype): the
# editable install's finder maps package names to folders and is consulted on import.
DAEMON_LAUNCHER = r"""
import os, sys
remap = os.environ.get("CORRAL_BENCH_PACKAGES")
if remap:
    finders = [m for n, m in list(sys.modules.items())
               if n.startswith("__editable__") and hasattr(m, "MAPPING")]
    if not finders:
        sys.exit("--daemon-package needs the editable install of corral (pip install -e .)")
    for item in remap.split(","):
        name, _, path = item.partition("=")
        for finder in finders:
            finder.MAPPING[name] = path
if os.environ.get("CORRAL_BENCH_GC_LOG"):
    # how long the cyclic GC holds the loop: per generation, count and worst pause (ns)
    import atexit, gc, json, time
    _gc = {"start": 0, "stats": {}}
    def _gc_cb(phase, info):
        if phase == "start":
            _gc["start"] = time.perf_counter_ns()
        else:
            d = time.perf_counter_ns() - _gc["start"]
            st = _gc["stats"].setdefault(str(info["generation"]), [0, 0, 0])
            st[0] += 1; st[1] += d; st[2] = max(st[2], d)
    gc.callbacks.append(_gc_cb)
    def _gc_dump():
        with open(os.environ["CORRAL_BENCH_GC_LOG"], "w") as f:
            json.dump({"gc": _gc["stats"], "objects": len(gc.get_objects())}, f)
    atexit.register(_gc_dump)
if os.environ.get("CORRAL_BENCH_INTERRUPT_LOG"):
    # where an interrupt's time goes inside the daemon: (sandbox id, CLOCK_MONOTONIC ns when
    # SessionManager.interrupt began, ns when it had written INTERRUPT), one line each
    import time
    from corral.runtime import sessions as _sessions
    _stamps = open(os.environ["CORRAL_BENCH_INTERRUPT_LOG"], "a", buffering=1)
    _interrupt = _sessions.SessionManager.interrupt
    def _stamped(self, caller, session):
        rx = time.monotonic_ns()
        _interrupt(self, caller, session)
        _stamps.write(f"{session.sandbox_id} {rx} {time.monotonic_ns()}\n")
    _sessions.SessionManager.interrupt = _stamped
if os.environ.get("CORRAL_BENCH_LOOP_LAG_LOG"):
    # how late the daemon's event loop runs a 1 ms timer: one line per late wake-up
    # (CLOCK_MONOTONIC ns when it ran, ns late, ns of the loop thread's CPU meanwhile: near
    # the lateness, a long callback; ns it waited on a run queue: no CPU), over 2 ms late
    import asyncio, time
    from corral.runtime import daemon as _daemon
    _lag_out = open(os.environ["CORRAL_BENCH_LOOP_LAG_LOG"], "a", buffering=1)
    _start = _daemon.Daemon.start
    async def _lag_probe():
        sched = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        def waited():  # ns this thread has waited on a run queue
            return int(os.pread(sched, 100, 0).split()[1])
        while True:
            due = time.monotonic_ns() + 1_000_000
            cpu, queued = time.thread_time_ns(), waited()
            await asyncio.sleep(0.001)
            now = time.monotonic_ns()
            if now - due > 2_000_000:
                _lag_out.write(f"{now} {now - due} {time.thread_time_ns() - cpu} "
                               f"{waited() - queued}\n")
    async def _start_probed(self):
        await _start(self)
        self._bench_lag = asyncio.get_running_loop().create_task(_lag_probe())
    _daemon.Daemon.start = _start_probed
if os.environ.get("CORRAL_BENCH_GC_FREEZE"):
    import gc
    gc.freeze()
if os.environ.get("CORRAL_BENCH_UVLOOP"):
    import uvloop
    uvloop.install()
from corral.runtime.cli import main
sys.argv[0] = "corral"
sys.exit(main())
"""

def percentile(values, p: float):
    """Nearest-rank percentile of a sorted sequence (None when empty)."""
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def ms(ns) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def dist_ms(values_ns) -> dict:
    v = sorted(values_ns)
    return {"n": len(v), "p50": ms(percentile(v, 50)), "p90": ms(percentile(v, 90)),
            "p99": ms(percentile(v, 99)), "p999": ms(percentile(v, 99.9)),
            "max": ms(v[-1] if v else None)}


def interrupt_split(raw: list[tuple[str, int, int]], stamps_at: str) -> dict:
    """Where the interrupts' time went (--daemon-env CORRAL_BENCH_INTERRUPT_LOG=FILE): the
    client's send -> the daemon's SessionManager.interrupt (client, gRPC, the daemon's
    loop), that call (its INTERRUPT write), and the write -> the agent's read (the agent's
    wake-up). Each client record is matched with its sandbox's daemon stamp inside it."""
    stamps: dict[str, list[tuple[int, int]]] = {}
    with open(stamps_at) as f:
        for line in f:
            sandbox, rx, wr = line.split()
            stamps.setdefault(sandbox, []).append((int(rx), int(wr)))
    to_daemon, in_daemon, to_agent = [], [], []
    for sandbox, sent, read in raw:
        match = next(((rx, wr) for rx, wr in stamps.get(sandbox, ()) if sent <= rx <= read),
                     None)
        if match is not None:
            to_daemon.append(match[0] - sent)
            in_daemon.append(match[1] - match[0])
            to_agent.append(read - match[1])
    return {"matched": len(to_daemon), "of": len(raw), "send_to_daemon": dist_ms(to_daemon),
            "daemon_call": dist_ms(in_daemon), "write_to_agent_read": dist_ms(to_agent)}


def client_gc(results: list[dict]) -> dict:
    """The clients' own cyclic GC over the window: collections and pauses per generation,
    and how many interrupts were sent by a client that collected while the interrupt was
    on its way (between its send and the agent's read): those are the client's pauses."""
    by_gen: dict[str, list[int]] = {}
    hit = slow_hit = slow = 0
    for r in results:
        pauses = r.get("gc_pauses", ())
        for _, dur, gen in pauses:
            by_gen.setdefault(str(gen), []).append(dur)
        for _, sent, read in r["interrupt_raw"]:
            during = any(start < read and start + dur > sent for start, dur, _ in pauses)
            hit += during
            if read - sent > 5_000_000:
                slow += 1
                slow_hit += during
    return {"collections": {g: len(v) for g, v in sorted(by_gen.items())},
            "pause_ms_max": {g: ms(max(v)) for g, v in sorted(by_gen.items())},
            "pause_ms_total": ms(sum(sum(v) for v in by_gen.values())),
            "interrupts_during_a_pause": hit,
            "interrupts_over_5ms": slow, "of_them_during_a_pause": slow_hit}


# --- the agent ---------------------------------------------------------------------------------


def build_agent(outdir: str, static: bool) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        sys.exit("bench/sessions.py needs gcc (apt-get install gcc) to build the bench agent")
    out = os.path.join(outdir, "bench_agent")
    cmd = [gcc, "-O2", "-Wall", "-o", out, AGENT_SOURCE] + (["-static"] if static else [])
    subprocess.run(cmd, check=True)
    return out


# --- the daemon --------------------------------------------------------------------------------


def stat_name_cpu_s(path: str) -> tuple[str, float]:
    """(command name, user + system CPU seconds) of a /proc/PID[/task/TID]/stat file.

    Raises:
        OSError: the process or thread is gone.
    """
    with open(path) as f:
        raw = f.read()
    # the name is between the first "(" and the last ")": it may hold either
    fields = raw.rsplit(")", 1)[1].split()
    return raw[raw.index("(") + 1:raw.rindex(")")], (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    return stat_name_cpu_s(f"/proc/{pid}/stat")[1]


def threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed)."""
    out: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                name, cpu_s = stat_name_cpu_s(f"/proc/{pid}/task/{tid}/stat")
            except FileNotFoundError:
                continue
            name = "main" if tid == str(pid) else re.sub(r"[0-9]+$", "N", name)
            out[name] = out.get(name, 0.0) + cpu_s
    return out


def schedstat_s(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(s on a CPU, s runnable but waiting for a CPU) of a thread (/proc/.../schedstat)."""
    path = f"/proc/{pid}/task/{tid or pid}/schedstat"
    try:
        with open(path) as f:
            on_cpu, waiting, _ = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def ctx_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process's main thread."""
    vol = invol = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    invol = int(line.split()[1])
    except OSError:
        pass
    return vol, invol


def machine_busy_s() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def all_processes_cpu_s() -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds)} of every process now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            out[int(entry)] = stat_name_cpu_s(f"/proc/{entry}/stat")
        except OSError:
            continue
    return out


class CpuWindow:
    """CPU use of the daemon (per thread), of every process, and of the machine between
    start() and stop(). `labels` names pids (the daemon, the client workers); other
    processes are grouped by command name (the agents are "bench_agent")."""

    def __init__(self, pid: int, labels: dict[int, str] | None = None):
        self.pid = pid
        self.labels = {pid: "daemon", **(labels or {})}

    def start(self) -> None:
        self.t = time.monotonic()
        self.procs = all_processes_cpu_s()
        self.daemon = proc_cpu_s(self.pid)
        self.threads = threads_cpu_s(self.pid)
        self.machine = machine_busy_s()
        self.sched = schedstat_s(self.pid)
        self.switches = ctx_switches(self.pid)

    def _by_process(self, wall: float) -> dict[str, float]:
        """Cores per process group over the window (processes that started inside it count
        whole; processes that ended inside it are missed)."""
        groups: dict[str, float] = {}
        for pid, (name, cpu) in all_processes_cpu_s().items():
            used = cpu - self.procs[pid][1] if pid in self.procs else cpu
            if used <= 0:
                continue
            label = self.labels.get(pid) or (name if name in ("bench_agent", "corral-init")
                                             else f"other: {name}")
            groups[label] = groups.get(label, 0.0) + used
        return {k: round(v / wall, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
                if v / wall >= 0.005}

    def stop(self) -> dict:
        wall = time.monotonic() - self.t
        daemon = proc_cpu_s(self.pid) - self.daemon
        threads = threads_cpu_s(self.pid)
        busy, total = machine_busy_s()
        on_cpu, waiting = schedstat_s(self.pid)
        vol, invol = ctx_switches(self.pid)
        per_thread = {k: round((v - self.threads.get(k, 0.0)) / wall, 3)
                      for k, v in threads.items() if v - self.threads.get(k, 0.0) > 0}
        return {"wall_s": round(wall, 3), "daemon_cpu_s": round(daemon, 3),
                "daemon_cores": round(daemon / wall, 3),
                "daemon_cores_by_thread": dict(sorted(per_thread.items(),
                                                      key=lambda kv: -kv[1])),
                # the event loop's thread: share of the window it ran, and the share it was
                # runnable but waiting for a CPU (the rest it slept: epoll, fsync, locks)
                "loop_thread_on_cpu": round((on_cpu - self.sched[0]) / wall, 3),
                "loop_thread_runqueue_wait": round((waiting - self.sched[1]) / wall, 3),
                # involuntary: preempted (e.g. by a process its own write just woke)
                "loop_thread_switches_per_s": {
                    "voluntary": round((vol - self.switches[0]) / wall),
                    "involuntary": round((invol - self.switches[1]) / wall)},
                "machine_busy_cores": round((busy - self.machine[0]) / wall, 3),
                "machine_cores": os.cpu_count(),
                "cores_by_process": self._by_process(wall)}


class Daemon:
    def __init__(self, workdir: str, impl: str, extra_env: dict[str, str],
                 packages: list[str], daemon_args: list[str] = ()):
        self.dir = tempfile.mkdtemp(prefix=f"daemon-{impl}-", dir=workdir)
        self.socket = os.path.join(self.dir, "corral.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        env = dict(os.environ)
        env.pop("CORRAL_SOCKET", None)
        env["CORRAL_STREAM_IMPL"] = impl
        env.update(extra_env)
        if packages:
            env["CORRAL_BENCH_PACKAGES"] = ",".join(
                f"{name}={os.path.abspath(path)}"
                for name, _, path in (p.partition("=") for p in packages))
        self.log = open(self.log_path, "wb")
        nice = extra_env.pop("__nice", None)
        own_session = extra_env.pop("__own_session", None) is not None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DAEMON_LAUNCHER, "daemon", "--socket", self.socket,
             "--state", os.path.join(self.dir, "state"), "--session-idle-ttl", "10m",
             *daemon_args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=own_session,
            preexec_fn=(lambda: os.nice(int(nice))) if nice else None)
        self.pid = self.proc.pid
        from corral.runtime.client import Client
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}); see "
                                   f"{self.log_path}:\n{self.tail()}")
            if os.path.exists(self.socket):
                try:
                    with Client.connect(socket=self.socket) as c:
                        c.list_sandboxes()
                    break
                except Exception:  # noqa: BLE001 - still starting
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start in 30 s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- single session: as fast as the agent can ----------------------------------------------


def run_single(sock: str, agent: bytes, tokens: int, pipe_bytes: int, cpu: CpuWindow) -> dict:
    from corral.runtime.client import Client

    with Client.connect(socket=sock) as c:
        sb = c.create_sandbox()
        try:
            c.write_file(sb.id, "bench_agent", agent, mode=0o755)
            argv = ["./bench_agent", "blast", str(tokens)] + ([str(pipe_bytes)] if pipe_bytes
                                                              else [])
            cpu.start()
            sent = time.monotonic_ns()
            stream = c.open_session(argv, sandbox_id=sb.id)
            first = last = None
            first_tokens = received = batches = lost = 0
            agent_end = None
            exit_code = None
            for ev in stream:
                kind = ev.WhichOneof("event")
                if kind == "batch":
                    now = time.monotonic_ns()
                    n = len(ev.batch.lengths)
                    batches += 1
                    lost += ev.batch.lost.count
                    if n:
                        if first is None:
                            first, first_tokens = now, n
                        last = now
                        received += n
                    for e in ev.batch.events:
                        with contextlib.suppress(ValueError):
                            agent_end = json.loads(e.payload)
                elif kind == "exited":
                    exit_code = ev.exited.returncode
            usage = cpu.stop()
        finally:
            c.destroy_sandbox(sb.id)
    if received + lost < tokens or first is None or last == first:
        raise RuntimeError(f"single session: {received} of {tokens} tokens arrived, {lost} "
                           f"lost (agent exit {exit_code}, last event {agent_end})")
    rate = (received - first_tokens) / ((last - first) / 1e9)
    out = {"tokens": tokens, "tokens_per_s": round(rate),
           "tokens_received": received, "tokens_lost": lost,
           "open_to_last_s": round((last - sent) / 1e9, 3), "batches": batches,
           "tokens_per_batch": round(received / batches, 1)}
    if agent_end and "start_ns" in agent_end:
        span = (agent_end["end_ns"] - agent_end["start_ns"]) / 1e9
        out["agent_write_tokens_per_s"] = round(tokens / span) if span > 0 else None
    out.update(usage)
    return out


# --- many sessions: the worker processes ------------------------------------------------------


class SessionDriver:
    """One session of a worker: records latencies, interrupts. With --api open it has its own
    Sessions.Open stream; with --api many it shares the worker's OpenMany stream (`ref`)."""

    def __init__(self, worker, sandbox_id: str, ref: str | None = None):
        self.w = worker
        self.sandbox_id = sandbox_id
        self.ref = ref  # its name on the worker's OpenMany stream; None: own Open stream
        self.call = None
        self.opened = asyncio.get_running_loop().create_future()
        self.exited = asyncio.get_running_loop().create_future()
        self.pending_interrupt = 0  # client send time (ns) of the interrupt not yet answered
        self.pending_input = 0
        self.answered = asyncio.Event()
        self.final: dict | None = None
        self.bursts = 0
        self.tokens = 0
        self.messages = 0  # batch messages received inside the window
        self.error: str | None = None

    async def run(self, argv: list[str]) -> None:
        """--api open: one Sessions.Open stream for this session."""
        pb = self.w.pb
        try:
            self.call = self.w.open_rpc()
            await self.call.write(pb.SessionRequest(start=pb.SessionStart(
                argv=argv, sandbox_id=self.sandbox_id)))
            while True:
                ev = await self.call.read()
                if ev is grpc_eof() or self.on_event(ev, time.monotonic_ns()):
                    return
        except Exception as exc:  # noqa: BLE001 - reported, not fatal to the other sessions
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finish()

    def finish(self) -> None:
        for fut in (self.opened, self.exited):
            if not fut.done():
                fut.set_result(None)

    async def send(self, **request) -> None:
        pb = self.w.pb
        if self.ref is None:
            await self.call.write(pb.SessionRequest(**request))
        else:
            await self.w.mux_write(pb.MuxRequest(ref=self.ref, **request))

    def on_event(self, ev, now: int) -> bool:
        """Record one SessionEvent; True once the session has exited."""
        w = self.w
        kind = ev.WhichOneof("event")
        if kind == "batch":
            batch = ev.batch
            in_window = w.t0 <= now <= w.t1
            if in_window:
                self.messages += 1
                self.tokens += len(batch.lengths)
                lat = w.latency
                for stamp in STAMP.findall(batch.text):
                    lat.append(now - int(stamp, 16))
                    self.bursts += 1
                    if w.slow is not None and lat[-1] > 20_000_000:
                        w.slow.write(f"{now} {lat[-1]}\n")
            for e in batch.events:
                self._agent_event(e, now, in_window)
        elif kind == "opened":
            if not self.opened.done():
                self.opened.set_result(None)
        elif kind == "exited":
            if not self.exited.done():
                self.exited.set_result(ev.exited.returncode)
            return True
        elif kind == "error":
            self.error = self.error or f"{ev.error.code}: {ev.error.message}"
            self.finish()
            return True
        return False

    def _agent_event(self, e, now: int, in_window: bool) -> None:
        try:
            obj = json.loads(e.payload)
        except ValueError:
            return
        if "read_ns" in obj and self.pending_interrupt:
            self.w.interrupts.append(obj["read_ns"] - self.pending_interrupt)
            self.w.interrupt_raw.append((self.sandbox_id, self.pending_interrupt,
                                         obj["read_ns"]))
            self.w.interrupt_roundtrip.append(now - self.pending_interrupt)
            self.pending_interrupt = 0
            self.answered.set()
        elif "input_read_ns" in obj and self.pending_input:
            self.w.inputs.append(obj["input_read_ns"] - self.pending_input)
            self.pending_input = 0
            self.answered.set()
        elif obj.get("status") == "completed":
            self.final = obj

    async def interrupter(self, mean_s: float, rng: random.Random) -> None:
        """Interrupt, wait for the TURN_END, send an input (next turn), wait for its echo."""
        pb = self.w.pb
        t1 = self.w.t1
        await asyncio.sleep(rng.uniform(0, 2 * mean_s))
        while time.monotonic_ns() < t1 and not self.exited.done():
            self.answered.clear()
            self.pending_interrupt = sent = time.monotonic_ns()
            await self.send(interrupt=pb.SessionInterrupt())
            # the client's own part: its turn to write on the stream, then gRPC's write
            self.w.interrupt_write.append(time.monotonic_ns() - sent)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.answered.wait(), 10)
            self.answered.clear()
            self.pending_input = time.monotonic_ns()
            await self.send(input=pb.SessionInput(text="go on"))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.answered.wait(), 10)
            await asyncio.sleep(rng.uniform(0.5 * mean_s, 1.5 * mean_s))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send(close=self.w.pb.SessionClose())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), 15)
        if self.call is not None:
            self.call.cancel()


_EOF = None


def grpc_eof():
    global _EOF
    if _EOF is None:
        import grpc.aio
        _EOF = grpc.aio.EOF
    return _EOF


class Worker:
    def __init__(self, cfg: dict):
        from corral.v1 import session_pb2

        self.cfg = cfg
        self.pb = session_pb2
        self.latency = array("q")
        self.interrupts = array("q")
        self.interrupt_roundtrip = array("q")
        self.interrupt_raw: list[tuple[str, int, int]] = []  # (sandbox, sent, agent read)
        self.interrupt_write = array("q")  # sent -> the client's write() returned
        self.inputs = array("q")
        self.t0 = self.t1 = 1 << 62
        slow = os.environ.get("CORRAL_BENCH_SLOW_TOKENS")
        #: CORRAL_BENCH_SLOW_TOKENS=FILE: each token over 20 ms late, appended there as
        #: "<CLOCK_MONOTONIC ns received> <ns late>" (a timeline of the tail)
        self.slow = open(slow, "a", buffering=1 << 16) if slow else None

    def connect(self) -> None:
        """The grpc.aio channel; made inside the running loop, which it binds to."""
        import grpc

        cfg = self.cfg
        session_pb2 = self.pb
        self.channel = grpc.aio.insecure_channel(f"unix:{cfg['socket']}", options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        self.open_rpc = self.channel.stream_stream(
            "/corral.v1.Sessions/Open",
            request_serializer=session_pb2.SessionRequest.SerializeToString,
            response_deserializer=session_pb2.SessionEvent.FromString)
        self.many_rpc = self.channel.stream_stream(
            "/corral.v1.Sessions/OpenMany",
            request_serializer=session_pb2.MuxRequest.SerializeToString,
            response_deserializer=session_pb2.MuxBatch.FromString)
        self.mux_call = None
        self.mux_lock = asyncio.Lock()
        self.mux_messages = 0  # MuxBatch messages received inside the window

    def watch_gc(self) -> list[tuple[int, int, int]]:
        """Record this client's cyclic GC collections from now on: (CLOCK_MONOTONIC ns at
        the start, ns it held the loop, generation), each one, so that the coordinator can
        tell a client's own pause from the daemon's or the machine's."""
        pauses: list[tuple[int, int, int]] = []
        began = [0]

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                began[0] = time.monotonic_ns()
            else:
                pauses.append((began[0], time.monotonic_ns() - began[0], info["generation"]))

        self._gc_callback = callback
        gc.callbacks.append(callback)
        return pauses

    async def mux_write(self, request) -> None:
        async with self.mux_lock:  # grpc.aio allows one write in flight per call
            await self.mux_call.write(request)

    async def mux_read(self, drivers: dict[str, SessionDriver]) -> None:
        """Dispatch the OpenMany stream's events to the sessions by ref."""
        try:
            while True:
                message = await self.mux_call.read()
                if message is grpc_eof():
                    return
                now = time.monotonic_ns()
                if self.t0 <= now <= self.t1:
                    self.mux_messages += 1
                for item in message.events:
                    driver = drivers.get(item.ref)
                    if driver is not None:
                        driver.on_event(item.event, now)
        except Exception as exc:  # noqa: BLE001
            for d in drivers.values():
                d.error = d.error or f"{type(exc).__name__}: {exc}"
        finally:
            for d in drivers.values():
                d.finish()

    async def main(self) -> None:
        from corral.runtime.client import Client

        cfg = self.cfg
        self.connect()
        loop = asyncio.get_running_loop()
        with open(cfg["agent"], "rb") as f:
            agent = f.read()
        client = Client.connect(socket=cfg["socket"])
        sandboxes: list[str] = []
        setup_failures: list[str] = []

        def setup_one() -> None:
            try:
                sb = client.create_sandbox()
            except Exception as exc:  # noqa: BLE001
                setup_failures.append(str(exc))
                return
            sandboxes.append(sb.id)
            try:
                client.write_file(sb.id, "bench_agent", agent, mode=0o755)
            except Exception as exc:  # noqa: BLE001
                setup_failures.append(str(exc))

        t = time.monotonic()
        argv = ["./bench_agent", "paced", str(cfg["rate"]), str(cfg["burst_ms"]),
                str(cfg["agent_max_s"])]
        # one at a time: sandbox, agent upload, session open; so a daemon that runs out of
        # something part-way still gets its first sessions running (and says what failed)
        drivers: list[SessionDriver] = []
        tasks = []
        many = cfg["api"] == "many"
        by_ref: dict[str, SessionDriver] = {}
        if many:
            self.mux_call = self.many_rpc()
            tasks.append(asyncio.ensure_future(self.mux_read(by_ref)))
        for i in range(cfg["sessions"]):
            before = len(sandboxes)
            await loop.run_in_executor(None, setup_one)
            if len(sandboxes) == before:
                continue
            d = SessionDriver(self, sandboxes[-1], ref=f"s{i}" if many else None)
            drivers.append(d)
            if many:
                by_ref[d.ref] = d
                await d.send(start=self.pb.SessionStart(argv=argv, sandbox_id=d.sandbox_id))
            else:
                tasks.append(asyncio.ensure_future(d.run(argv)))
            await d.opened
        opened = sum(1 for d in drivers if d.error is None)
        emit({"ready": True, "opened": opened, "setup_s": round(time.monotonic() - t, 2),
              "setup_failures": setup_failures[:3]})
        line = await loop.run_in_executor(None, sys.stdin.readline)
        self.t0, self.t1 = (int(x) for x in line.split()[1:3])
        rng = random.Random(cfg["seed"])
        await asyncio.sleep(max(0.0, (self.t0 - time.monotonic_ns()) / 1e9))
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        gc_pauses = self.watch_gc()
        interrupters = []
        if cfg["interrupt_every_s"] > 0:
            interrupters = [asyncio.ensure_future(d.interrupter(cfg["interrupt_every_s"], rng))
                            for d in drivers if d.error is None]
        await asyncio.sleep(max(0.0, (self.t1 - time.monotonic_ns()) / 1e9))
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        gc.callbacks.remove(self._gc_callback)
        window_s = (self.t1 - self.t0) / 1e9
        for task in interrupters:
            task.cancel()
        await asyncio.gather(*interrupters, return_exceptions=True)
        await asyncio.gather(*(d.close() for d in drivers if d.call is not None or many))
        if many:
            with contextlib.suppress(Exception):
                await self.mux_call.done_writing()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.channel.close()

        def destroy_all() -> None:
            for sb in sandboxes:
                with contextlib.suppress(Exception):
                    client.destroy_sandbox(sb)

        await loop.run_in_executor(None, destroy_all)
        client.close()
        finals = [d.final for d in drivers if d.final]
        emit({
            "latency_ns": list(self.latency),
            "interrupt_ns": list(self.interrupts),
            "interrupt_roundtrip_ns": list(self.interrupt_roundtrip),
            "interrupt_raw": self.interrupt_raw,
            "interrupt_write_ns": list(self.interrupt_write),
            "input_ns": list(self.inputs),
            "tokens": sum(d.tokens for d in drivers),
            "bursts": sum(d.bursts for d in drivers),
            "messages": (self.mux_messages if many else sum(d.messages for d in drivers)),
            "session_batches": sum(d.messages for d in drivers),
            "agent_bursts": sum(f.get("bursts", 0) for f in finals),
            "agent_skipped": sum(f.get("skipped", 0) for f in finals),
            "agents_reported": len(finals),
            "errors": ([d.error for d in drivers if d.error] + setup_failures)[:5],
            "gc_pauses": gc_pauses,
            "client_cpu_s": round((ru1.ru_utime + ru1.ru_stime)
                                  - (ru0.ru_utime + ru0.ru_stime), 3),
            "window_s": window_s,
        })


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(cfg_json: str) -> int:
    asyncio.run(Worker(json.loads(cfg_json)).main())
    return 0


# --- many sessions: the coordinator ----------------------------------------------------------


def run_sessions(daemon: Daemon, agent_path: str, n: int, args, *, duration: float,
                 interrupt_every_s: float, workers: int, pyspy: str | None = None,
                 keep_samples: bool = False) -> dict:
    workers = max(1, min(workers, n))
    share = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    procs = []
    for i, count in enumerate(share):
        cfg = {"socket": daemon.socket, "agent": agent_path, "sessions": count,
               "rate": args.rate, "burst_ms": args.burst_ms,
               "agent_max_s": 120 + duration + args.warmup,
               "interrupt_every_s": interrupt_every_s, "seed": 1000 + i, "api": args.api}
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=(lambda: os.nice(args.client_nice)) if args.client_nice else None))
    readies = []
    for p in procs:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a client worker died during setup (exit {p.wait()}); "
                               f"daemon log:\n{daemon.tail()}")
        readies.append(json.loads(line))
    opened = sum(r["opened"] for r in readies)
    t0 = time.monotonic_ns() + int(args.warmup * 1e9)
    t1 = t0 + int(duration * 1e9)
    for p in procs:
        p.stdin.write(f"go {t0} {t1}\n")
        p.stdin.flush()
    cpu = CpuWindow(daemon.pid, {p.pid: "bench clients" for p in procs})
    time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
    spy = None
    if pyspy:
        spy = subprocess.Popen(
            [shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"),
             "record", "--pid", str(daemon.pid), "--duration", str(int(duration)),
             "--rate", "100", "--output", pyspy,
             # FILE.svg: a flame graph; anything else: raw collapsed stacks
             "--format", "flamegraph" if pyspy.endswith(".svg") else "raw"]
            # --native pauses the daemon for each sample (slower, but sees C frames)
            + (["--native"] if args.py_spy_native else ["--nonblocking"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu.start()
    time.sleep(max(0.0, (t1 - time.monotonic_ns()) / 1e9))
    usage = cpu.stop()
    if spy is not None:
        spy.wait()
    results = []
    for p in procs:
        line = p.stdout.readline()
        p.wait()
        if not line:
            raise RuntimeError(f"a client worker died (exit {p.returncode})")
        results.append(json.loads(line))
    lat = [x for r in results for x in r["latency_ns"]]
    intr = [x for r in results for x in r["interrupt_ns"]]
    intr_rt = [x for r in results for x in r["interrupt_roundtrip_ns"]]
    stamps_at = dict(kv.split("=", 1) for kv in args.daemon_env).get("CORRAL_BENCH_INTERRUPT_LOG")
    inputs = [x for r in results for x in r["input_ns"]]
    tokens = sum(r["tokens"] for r in results)
    bursts = sum(r["bursts"] for r in results)
    messages = sum(r["messages"] for r in results)
    session_batches = sum(r["session_batches"] for r in results)
    expected_bursts = opened * duration * 1000 / args.burst_ms
    latency = dist_ms(lat)
    interrupt = dist_ms(intr)
    client_cpu = sum(r["client_cpu_s"] for r in results)
    out = {
        "sessions": opened,
        "sessions_tried": n,
        "latency_ms_p50": latency["p50"],
        "latency_ms_p99": latency["p99"],
        "interrupt_ms_p50": interrupt["p50"],
        "interrupt_ms_p99": interrupt["p99"],
        "latency_ms": latency,
        "interrupt_ms": interrupt,
        "interrupt_roundtrip_ms": dist_ms(intr_rt),
        # the client's send -> its write() returning (its turn on the stream, gRPC's write)
        "interrupt_client_write_ms": dist_ms([x for r in results
                                              for x in r["interrupt_write_ns"]]),
        **({"interrupt_split_ms": interrupt_split(
            [tuple(x) for r in results for x in r["interrupt_raw"]], stamps_at)}
           if stamps_at else {}),
        "input_ms": dist_ms(inputs),
        "client_gc": client_gc(results),
        "tokens_per_s_delivered": round(tokens / duration),
        "tokens_per_s_offered": opened * args.rate,
        "bursts_delivered_ratio": round(bursts / expected_bursts, 4) if expected_bursts else None,
        "agent_skipped_bursts": sum(r["agent_skipped"] for r in results),
        "batch_messages_per_s": round(messages / duration),
        "bursts_per_message": round(bursts / messages, 3) if messages else None,
        "session_batches_per_message": (round(session_batches / messages, 3)
                                        if messages else None),
        "api": args.api,
        "client_workers": len(procs),
        "client_cores": round(client_cpu / duration, 3),
        "setup_s": max(r["setup_s"] for r in readies),
        "errors": [e for r in results for e in r["errors"]][:5],
        "window_s": duration,
        "warmup_s": args.warmup,
    }
    out.update(usage)
    # CPU cost, which load from other processes disturbs far less than latency does
    out["daemon_us_per_message"] = (round(usage["daemon_cpu_s"] / messages * 1e6, 1)
                                    if messages else None)
    out["client_us_per_message"] = round(client_cpu / messages * 1e6, 1) if messages else None
    # per agent burst: the same unit whatever the API packs into one message
    out["daemon_us_per_burst"] = (round(usage["daemon_cpu_s"] / bursts * 1e6, 1)
                                  if bursts else None)
    out["meets_latency_target"] = bool(
        opened == n and latency["p99"] is not None and latency["p99"] <= 20.0
        and out["bursts_delivered_ratio"] is not None and out["bursts_delivered_ratio"] >= 0.98)
    if pyspy:
        out["py_spy_raw"] = pyspy
    if keep_samples:  # the raw token latencies, for a caller that pools windows (_mixed)
        out["latency_ns"] = lat
    return out


def sweep(daemon: Daemon, agent_path: str, args, first: dict) -> dict:
    """Largest N (multiple of --sweep-step) meeting p99 <= 20 ms, by bisection."""
    step = args.sweep_step
    tried = {first["sessions_tried"]: first}
    if first["meets_latency_target"]:
        return {"max_sessions_meeting_target": first["sessions"], "runs": _brief(tried)}
    lo, hi = 0, first["sessions_tried"]
    while hi - lo > step:
        mid = max(step, (lo + hi) // 2 // step * step)
        if mid in tried or mid <= lo:
            break
        res = run_sessions(daemon, agent_path, mid, args, duration=args.sweep_duration,
                           interrupt_every_s=args.interrupt_every, workers=args.workers)
        tried[mid] = res
        if res["meets_latency_target"]:
            lo = mid
        else:
            hi = mid
    return {"max_sessions_meeting_target": lo, "runs": _brief(tried)}


def _brief(tried: dict) -> list[dict]:
    keys = ("sessions_tried", "sessions", "latency_ms_p50", "latency_ms_p99", "interrupt_ms_p50",
            "interrupt_ms_p99", "bursts_delivered_ratio", "daemon_cores", "client_cores",
            "machine_busy_cores", "meets_latency_target")
    return [{k: r[k] for k in keys} for _, r in sorted(tried.items())]


# --- one implementation, end to end -------------------------------------------------------------


def run_impl(impl: str, args, workdir: str, agent_path: str, log) -> dict:
    twin = impl == "python"
    extra_env = dict(kv.split("=", 1) for kv in args.daemon_env)
    if args.daemon_nice:
        extra_env["__nice"] = str(args.daemon_nice)
    if args.daemon_own_session:
        extra_env["__own_session"] = "1"
    daemon = Daemon(workdir, impl, extra_env, args.daemon_package, args.daemon_arg)
    try:
        with open(agent_path, "rb") as f:
            agent = f.read()
        cpu = CpuWindow(daemon.pid)
        tokens = args.twin_tokens if twin else args.tokens
        result: dict = {}
        parts = set(args.parts.split(","))
        if "single" in parts:
            log(f"[{impl}] single session, {tokens:,} tokens x {args.repeats}")
            singles = [run_single(daemon.socket, agent, tokens, args.pipe_bytes, cpu)
                       for _ in range(args.repeats)]
            singles.sort(key=lambda r: r["tokens_per_s"])
            single = singles[len(singles) // 2]
            single["all_tokens_per_s"] = [r["tokens_per_s"] for r in singles]
            log(f"[{impl}]   {single['tokens_per_s']:,} tokens/s")
            result["single_session_tokens_per_s"] = single["tokens_per_s"]
            result["single"] = single
        if "idle" in parts:
            log(f"[{impl}] one paced session alone, interrupts every "
                f"~{args.idle_interrupt_every}s")
            idle = run_sessions(daemon, agent_path, 1, args, duration=args.idle_duration,
                                interrupt_every_s=args.idle_interrupt_every, workers=1)
            log(f"[{impl}]   interrupt p50 {idle['interrupt_ms_p50']} p99 "
                f"{idle['interrupt_ms_p99']} ms")
            result["interrupt_idle"] = {k: idle[k] for k in (
                "interrupt_ms", "interrupt_roundtrip_ms", "input_ms", "latency_ms",
                "daemon_cores")}
        if "mixed" in parts and not twin:  # delegated deep tasks beside the sessions
            import _mixed

            result["mixed"] = _mixed.run_mixed(daemon, agent_path, args, log, run_sessions)
        if "sessions" not in parts:
            return result
        n = args.sessions
        log(f"[{impl}] {n} sessions x {args.rate} tokens/s, {args.workers} client processes, "
            f"{args.duration}s window")
        many = run_sessions(daemon, agent_path, n, args, duration=args.duration,
                            interrupt_every_s=args.interrupt_every, workers=args.workers,
                            pyspy=(args.py_spy if args.py_spy and not twin else None))
        log(f"[{impl}]   latency p50 {many['latency_ms_p50']} p99 {many['latency_ms_p99']} ms, "
            f"interrupt p99 {many['interrupt_ms_p99']} ms, delivered "
            f"{many['bursts_delivered_ratio']}, daemon {many['daemon_cores']} cores")
        result.update({
            "sessions": many["sessions"],
            "latency_ms_p50": many["latency_ms_p50"],
            "latency_ms_p99": many["latency_ms_p99"],
            "interrupt_ms_p50": many["interrupt_ms_p50"],
            "interrupt_ms_p99": many["interrupt_ms_p99"],
            "sessions_run": many,
        })
        if args.sweep:
            log(f"[{impl}] sweep: largest N with p99 <= 20 ms")
            result["sweep"] = sweep(daemon, agent_path, args, many)
            log(f"[{impl}]   {result['sweep']['max_sessions_meeting_target']} sessions")
        return result
    finally:
        daemon.stop()


def machine_info() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=HERE).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=HERE).stdout.strip()
        commit = head + ("+dirty" if dirty else "")
    except OSError:
        commit = None
    import grpc
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "grpcio": grpc.__version__,
            "commit": commit, "loadavg_start": os.getloadavg()[0]}


def ratio(a, b):
    return round(a / b, 2) if a and b else None


#: How much one run measures; --quick also skips the sweep.
SIZES = {
    "sessions": harness.Size(256, 32, "concurrent sessions"),
    "duration": harness.Size(10.0, 3.0, "measurement window, s"),
    "warmup": harness.Size(3.0, 1.0, "s after every session is open before the window starts"),
    "idle_duration": harness.Size(5.0, 2.0, "s of the idle-interrupt measurement"),
    "tokens": harness.Size(20_000_000, 3_000_000, "tokens of the single-session run (compiled)"),
    "twin_tokens": harness.Size(2_000_000, 300_000, "the same for the Python twin"),
    "repeats": harness.Size(3, 1, "single-session runs; the median one is reported"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    harness.add_sizes(ap, SIZES)
    ap.add_argument("--api", choices=("many", "open"), default="many",
                    help="many: each client worker multiplexes its sessions over one "
                         "Sessions.OpenMany stream (default); open: one Sessions.Open "
                         "stream per session")
    ap.add_argument("--workers", type=int, default=4,
                    help="client processes sharing the sessions (4)")
    ap.add_argument("--rate", type=int, default=1000, help="tokens/s per paced session")
    ap.add_argument("--burst-ms", type=float, default=10.0, help="ms between bursts (10)")
    ap.add_argument("--interrupt-every", type=float, default=5.0,
                    help="mean s between one session's interrupts under load (5)")
    ap.add_argument("--idle-interrupt-every", type=float, default=0.02)
    ap.add_argument("--pipe-bytes", type=int, default=0,
                    help="single run: the agent asks F_SETPIPE_SZ for its events pipe")
    ap.add_argument("--parts", default="single,idle,sessions",
                    help="which measurements (comma-separated): single, idle, sessions, "
                         "mixed (sessions while delegated deep tasks run)")
    ap.add_argument("--mixed-task-steps", type=int, default=20,
                    help="mixed: PROGRESS reports (100 ms apart) of each delegated task (20)")
    ap.add_argument("--mixed-pairs", type=int, default=2,
                    help="mixed: pairs of windows, alone and under the tasks, alternating "
                         "(alone, mixed, mixed, alone, ...); the p99s pool each kind's "
                         "samples (default 2)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--sweep-step", type=int, default=32)
    ap.add_argument("--sweep-duration", type=float, default=6.0)
    ap.add_argument("--no-twin", dest="twin", action="store_false")
    ap.add_argument("--only-twin", action="store_true")
    ap.add_argument("--static-agent", action="store_true", help="link the agent statically")
    ap.add_argument("--py-spy", metavar="FILE",
                    help="py-spy record the daemon over the N-session window (raw; "
                         "a flame graph when FILE ends in .svg)")
    ap.add_argument("--py-spy-native", action="store_true",
                    help="with --py-spy: also sample C frames (grpc's Cython and C core)")
    ap.add_argument("--daemon-nice", type=int, default=0,
                    help="start the daemon at this nice value (experiment: CPU weight)")
    ap.add_argument("--daemon-own-session", action="store_true",
                    help="start the daemon in a session of its own (setsid): where the "
                         "kernel groups processes by session for the CPU (autogroup), it "
                         "then competes as its own group, as under a service manager's "
                         "cgroup, instead of sharing one with the bench's clients")
    ap.add_argument("--client-nice", type=int, default=0,
                    help="run the client workers at this nice value")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="K=V")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra `corral daemon` argument, e.g. --daemon-arg=--mux-interval-ms=0"
                         " (repeatable)")
    ap.add_argument("--daemon-package", action="append", default=[], metavar="NAME=DIR",
                    help="daemon imports package NAME (e.g. corral.runtime) from DIR: A/B "
                         "runs of a patched copy; repeatable")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    harness.apply_quick(args, SIZES)
    if args.quick:
        args.sweep = False
    if os.geteuid() != 0:
        print("note: the daemon's sandboxes need root (or delegated cgroups)", file=sys.stderr)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = tempfile.mkdtemp(prefix="bench-sessions-")  # not "corral-*": test cleanups glob that
    try:
        agent_path = build_agent(workdir, args.static_agent)
        result: dict = {"targets": TARGETS, "machine": machine_info()}
        compiled = twin = None
        if not args.only_twin:
            compiled = run_impl("cython", args, workdir, agent_path, log)
            result.update(compiled)
        if args.twin or args.only_twin:
            twin = run_impl("python", args, workdir, agent_path, log)
            result["python_twin"] = twin
        if compiled and twin and "sessions_run" in compiled and "single" in compiled:
            result["ratios_compiled_vs_twin"] = {
                "single_session_tokens_per_s": ratio(compiled["single_session_tokens_per_s"],
                                                     twin["single_session_tokens_per_s"]),
                "latency_ms_p99": ratio(twin["latency_ms_p99"], compiled["latency_ms_p99"]),
                "interrupt_ms_p99": ratio(twin["interrupt_ms_p99"],
                                          compiled["interrupt_ms_p99"]),
                "daemon_cores_under_load": ratio(twin["sessions_run"]["daemon_cores"],
                                                 compiled["sessions_run"]["daemon_cores"]),
            }
        if compiled and "sessions_run" in compiled and "single" in compiled:
            run = compiled["sessions_run"]
            result["meets"] = {
                "single_session_tokens_per_s": compiled["single_session_tokens_per_s"]
                >= 1_000_000,
                "sessions_256_p99_20ms": run["sessions"] >= 256 and run["meets_latency_target"],
                "interrupt_p99_5ms": (compiled["interrupt_ms_p99"] is not None
                                      and compiled["interrupt_ms_p99"] <= 5.0),
            }
        result["settings"] = {k: getattr(args, k) for k in (
            "sessions", "workers", "rate", "burst_ms", "duration", "warmup", "interrupt_every",
            "tokens", "twin_tokens", "repeats", "quick", "daemon_env", "daemon_package",
            "daemon_nice", "daemon_own_session", "client_nice", "parts", "api", "daemon_arg",
            "pipe_bytes")}
        result["machine"]["loadavg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


def print_table(r: dict) -> None:
    def get(x: dict, path: str):
        for part in path.split("."):
            x = x.get(part) if isinstance(x, dict) else None
        return x

    def row(label, path, target=""):
        c = get(r, path)
        t = get(r.get("python_twin", {}), path)
        print(f"{label:<34}{c!s:>14}{t!s:>14}   {target}")

    print(f"{'':<34}{'compiled':>14}{'python twin':>14}   target")
    row("single session tokens/s", "single_session_tokens_per_s", ">= 1,000,000")
    row("sessions opened", "sessions", "256")
    row("sessions tried", "sessions_run.sessions_tried")
    row("token latency p50 ms", "latency_ms_p50")
    row("token latency p99 ms", "latency_ms_p99", "<= 20")
    row("interrupt p50 ms (under load)", "interrupt_ms_p50")
    row("interrupt p99 ms (under load)", "interrupt_ms_p99", "<= 5")
    row("interrupt p50 ms (one session)", "interrupt_idle.interrupt_ms.p50")
    row("interrupt p99 ms (one session)", "interrupt_idle.interrupt_ms.p99", "<= 5")
    row("daemon cores (N sessions)", "sessions_run.daemon_cores")
    row("daemon us CPU per message", "sessions_run.daemon_us_per_message")
    row("largest N with p99 <= 20 ms", "sweep.max_sessions_meeting_target")
    if "sessions_run" in r:
        s = r["sessions_run"]
        print(f"N-session window: clients {s['client_cores']} cores, machine "
              f"{s['machine_busy_cores']} of {s['machine_cores']} busy, bursts delivered "
              f"{s['bursts_delivered_ratio']}; by process {s['cores_by_process']}")
        if s.get("errors"):
            print(f"errors (first): {s['errors'][0][:200]}")
    if "meets" in r:
        print("meets:", r["meets"])


if __name__ == "__main__":
    sys.exit(main())
