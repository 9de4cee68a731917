"""The asyncio adapter (runtime/streams.py) over real pipes: what the daemon can do before gRPC.

Three measurements, each with the compiled token core and with its Python twin:

throughput   one producer process writes 4-byte TOKEN frames as fast as it can into a pipe
             (128 KiB writes; and one write per frame, as ext/agent.py does);
             StreamHub -> one Watcher calling next_batch() in a loop (what a servicer does,
             minus gRPC): tokens/s and batches/s at the watcher, the loop's CPU use and how
             late a 1 ms timer fired meanwhile (max loop lag).
latency      N pipes (default 256) paced at R tokens/s each, in bursts every B ms (one
             producer process writes all of them; the first token of each burst is the
             CLOCK_MONOTONIC time of its write, in hex), one hub + one watcher per pipe:
             write -> next_batch() return latency p50/p99, batches/s, the loop's CPU use.
             Under the same load, interrupts are scheduled on the loop every few ms and sent
             with ControlWriter to control pipes the producer polls: scheduled time ->
             producer read latency p50/p99 (timer lag on a busy loop included).
message cost the latency run again with a stand-in for gRPC: each batch costs the consumer
             N us of CPU on the loop thread, then a yield (grpc.aio measured ~50 us per
             message here; how much of it lands on the loop thread is for the daemon's
             bench to say). Shows where the loop saturates.
coalescing   smooth producers (one token per write, no bursts) with coalesce_s 0 and > 0,
             under a message cost: how many batches it saves and what it costs in latency.

    python bench/stream_loop.py --json      # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import time

from corral.runtime.streams import ControlWriter, StreamHub, make_pipe_pair, pipe_capacity
from corral.v1 import stream_pb2

THROUGHPUT_PRODUCER = r"""
import os, sys
fd, tokens, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = ((4).to_bytes(4, "little") + b"\x01" + b"tok ") * tokens
view = memoryview(data)
for pos in range(0, len(view), chunk):
    os.write(fd, view[pos:pos + chunk])
"""

# Writes bursts to every pipe on a fixed schedule (pipes staggered over the period), and
# polls the control pipes between writes, stamping every control frame's arrival.
PACED_PRODUCER = r"""
import json, os, select, sys, time
cfg = json.loads(sys.argv[1])
fds, controls = cfg["fds"], cfg["controls"]
period_ns = int(cfg["burst_ms"] * 1e6)
per_burst = cfg["tokens_per_burst"]
rest = ((4).to_bytes(4, "little") + b"\x01" + b"tok ") * (per_burst - 1)
head = (16).to_bytes(4, "little") + b"\x01"
n = len(fds)
start = time.monotonic_ns() + 50_000_000
end = start + int(cfg["seconds"] * 1e9)
due = [start + i * period_ns // n for i in range(n)]
ep = select.epoll()
for fd in controls:
    os.set_blocking(fd, False)
    ep.register(fd, select.EPOLLIN)
received = {fd: [] for fd in controls}
i = 0
monotonic_ns, write = time.monotonic_ns, os.write
while True:
    now = monotonic_ns()
    if now >= end:
        break
    # write every burst that is due (the pipes are due in round-robin order)
    while due[i] <= now:
        write(fds[i], head + b"%016x" % monotonic_ns() + rest)
        due[i] += period_ns
        i = i + 1 if i + 1 < n else 0
    timeout = (due[i] - monotonic_ns()) / 1e9
    for fd, _ in ep.poll(max(timeout, 0)):
        stamp = monotonic_ns()
        data = os.read(fd, 65536)
        received[fd].extend([stamp] * data.count(b"\x00\x00\x00\x00\x82"))
for fd in fds:
    os.close(fd)
print(json.dumps({str(fd): stamps for fd, stamps in received.items()}))
"""


def load(name: str):
    return importlib.import_module("corral.ext._stream" if name == "cython"
                                   else "corral.ext._stream_py")


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


# --- throughput ------------------------------------------------------------------------


async def throughput(core, tokens: int, pipe_bytes: int | None, max_bytes: int,
                     write_bytes: int = 128 << 10, coalesce_s: float = 0.0) -> dict:
    r, w = make_pipe_pair(size=pipe_bytes)
    capacity = pipe_capacity(r)
    hub = StreamHub(core.TokenStream("frames"))
    hub.attach_fd(r)
    watcher = hub.watch(coalesce_s=coalesce_s)
    proc = subprocess.Popen([sys.executable, "-c", THROUGHPUT_PRODUCER, str(w), str(tokens),
                             str(write_bytes)], pass_fds=(w,))
    os.close(w)
    lag = 0.0
    done = False

    async def ticker() -> None:  # how late a 1 ms timer fires while the stream runs
        nonlocal lag
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lag = max(lag, time.perf_counter() - before - 0.001)

    tick = asyncio.ensure_future(ticker())
    batches = 0
    raw = await watcher.next_batch(max_bytes)  # the clock starts at the first batch
    t0, cpu0 = time.perf_counter(), time.process_time()
    first = watcher.statistics().entries
    nbytes = 0
    while raw is not None:
        batches += 1
        nbytes += len(raw)
        raw = await watcher.next_batch(max_bytes)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = True
    await tick
    proc.wait()
    stats = watcher.statistics()
    hstats = hub.statistics()
    if stats.entries != tokens or stats.lost_entries:
        raise RuntimeError(f"lost tokens: {stats}")
    counted = tokens - first
    return {
        "tokens": tokens,
        "pipe_bytes": capacity,
        "tokens_per_s": round(counted / elapsed),
        "batches_per_s": round((batches - 1) / elapsed),
        "avg_batch_bytes": round(nbytes / max(batches - 1, 1)),
        "avg_batch_tokens": round(counted / max(batches - 1, 1)),
        "readable_events": hstats.readable_events,
        "avg_bytes_per_read": round(hstats.bytes_read / max(hstats.read_calls, 1)),
        "loop_cpu_fraction": round(cpu / elapsed, 3),
        "max_loop_lag_ms": round(lag * 1e3, 2),
        "producer_write_bytes": write_bytes,
        "coalesce_ms": coalesce_s * 1e3,
        "seconds": round(elapsed, 3),
    }


# --- latency -----------------------------------------------------------------------------


async def latency(core, sessions: int, rate: int, burst_ms: float, seconds: float,
                  coalesce_s: float, interrupts: int, interrupt_every_ms: float,
                  message_cost_us: float = 0.0, warmup_s: float = 0.5) -> dict:
    tokens_per_burst = max(1, round(rate * burst_ms / 1000))
    loop = asyncio.get_running_loop()
    pipes = [make_pipe_pair() for _ in range(sessions)]
    controls = [make_pipe_pair() for _ in range(interrupts)]
    hubs = []
    watchers = []
    for r, _ in pipes:
        hub = StreamHub(core.TokenStream("frames"))
        hub.attach_fd(r)
        hubs.append(hub)
        watchers.append(hub.watch(coalesce_s=coalesce_s))
    writers = [ControlWriter(w) for _, w in controls]
    cfg = {"fds": [w for _, w in pipes], "controls": [r for r, _ in controls],
           "burst_ms": burst_ms, "tokens_per_burst": tokens_per_burst, "seconds": seconds}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PACED_PRODUCER, json.dumps(cfg),
        pass_fds=cfg["fds"] + cfg["controls"], stdout=subprocess.PIPE)
    for _, w in pipes:
        os.close(w)
    for r, _ in controls:
        os.close(r)

    t_start = time.monotonic_ns() + int(warmup_s * 1e9)
    samples: list[int] = []  # ns, one per burst
    batch_count = 0

    cost_ns = int(message_cost_us * 1000)

    async def consume(watcher) -> None:
        nonlocal batch_count
        next_batch, from_string, ns = watcher.next_batch, stream_pb2.StreamBatch.FromString, \
            time.monotonic_ns
        while (raw := await next_batch()) is not None:
            now = ns()
            batch_count += 1
            if cost_ns:  # stand-in for sending the batch over gRPC: CPU on the loop, a yield
                until = now + cost_ns
                while ns() < until:
                    pass
                await asyncio.sleep(0)
            batch = from_string(raw)
            text = batch.text
            pos = 0
            for n in batch.lengths:
                if n == 16:
                    sent = int(text[pos:pos + 16], 16)
                    if sent >= t_start:
                        samples.append(now - sent)
                pos += n

    sent_at: dict[int, list[int]] = {i: [] for i in range(interrupts)}

    def send_interrupt(i: int, planned_ns: int) -> None:
        sent_at[i].append(planned_ns)
        writers[i].send_interrupt()

    if interrupts:
        # planned on the loop's own clock (time.monotonic, the producer's clock too)
        step = interrupt_every_ms / 1000
        t = loop.time() + warmup_s
        k = 0
        while t < loop.time() + seconds - 0.2:
            loop.call_at(t, send_interrupt, k % interrupts, round(t * 1e9))
            t += step
            k += 1

    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.ensure_future(consume(w)) for w in watchers]
    out, _ = await proc.communicate()
    await asyncio.gather(*tasks)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for writer in writers:
        writer.close()
    received = json.loads(out)
    interrupt_lat: list[int] = []
    for i, (r, _) in enumerate(controls):
        got = received[str(r)]
        for planned, stamp in zip(sent_at[i], got, strict=False):
            interrupt_lat.append(stamp - planned)
    tokens = sum(w.statistics().entries for w in watchers)
    lat_ms = [s / 1e6 for s in samples]
    int_ms = [s / 1e6 for s in interrupt_lat]
    return {
        "sessions": sessions,
        "tokens_per_s_each": rate,
        "burst_ms": burst_ms,
        "tokens_per_burst": tokens_per_burst,
        "coalesce_ms": coalesce_s * 1e3,
        "message_cost_us": message_cost_us,
        "seconds": round(elapsed, 2),
        "tokens": tokens,
        "tokens_per_s_total": round(tokens / elapsed),
        "batches_per_s": round(batch_count / elapsed),
        "bursts_measured": len(samples),
        "latency_ms_p50": _ms(percentile(lat_ms, 50)),
        "latency_ms_p99": _ms(percentile(lat_ms, 99)),
        "latency_ms_max": _ms(max(lat_ms, default=None)),
        "interrupts_measured": len(int_ms),
        "interrupt_ms_p50": _ms(percentile(int_ms, 50)),
        "interrupt_ms_p99": _ms(percentile(int_ms, 99)),
        "loop_cpu_fraction": round(cpu / elapsed, 3),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tokens", type=int, default=5_000_000,
                        help="throughput run, compiled core (the twin gets a tenth)")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--rate", type=int, default=1000, help="tokens/s per session")
    parser.add_argument("--burst-ms", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="per latency run")
    parser.add_argument("--interrupts", type=int, default=16,
                        help="control pipes that receive interrupts during the latency run")
    parser.add_argument("--interrupt-every-ms", type=float, default=5.0)
    parser.add_argument("--message-costs-us", default="25,50",
                        help="comma-separated stand-in costs per batch for the message-cost runs")
    parser.add_argument("--smooth-sessions", type=int, default=64,
                        help="coalescing run: sessions writing one token per write")
    parser.add_argument("--coalesce-ms", type=float, default=5.0)
    parser.add_argument("--coalesce-message-cost-us", type=float, default=25.0)
    args = parser.parse_args(argv)

    try:
        load("cython")
    except ImportError as exc:
        print(f"corral.ext._stream is not built ({exc}); run `make ext`", file=sys.stderr)
        return 1
    result: dict = {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count()}
    for name in ("cython", "python"):
        core = load(name)
        tokens = args.tokens if name == "cython" else args.tokens // 10
        section: dict = {"throughput": {}, "latency": None}
        for label, pipe_bytes in (("pipe_64k", None), ("pipe_1m", 1 << 20)):
            section["throughput"][label] = asyncio.run(
                throughput(core, tokens, pipe_bytes, 64 << 10))
        # a producer like ext/agent.py: one write() per token (the producer is the limit)
        section["throughput"]["frame_per_write"] = asyncio.run(
            throughput(core, tokens // 5, 1 << 20, 64 << 10, write_bytes=9))
        # the same with coalescing: a hot stream's tiny batches at most once per ms
        section["throughput"]["frame_per_write_coalesce_1ms"] = asyncio.run(
            throughput(core, tokens // 5, 1 << 20, 64 << 10, write_bytes=9, coalesce_s=0.001))
        section["latency"] = asyncio.run(latency(
            core, args.sessions, args.rate, args.burst_ms, args.seconds, 0.0,
            args.interrupts, args.interrupt_every_ms))
        if name == "cython":
            costs = [float(c) for c in args.message_costs_us.split(",") if c.strip()]
            section["message_cost"] = [asyncio.run(latency(
                core, args.sessions, args.rate, args.burst_ms, args.seconds, 0.0,
                args.interrupts, args.interrupt_every_ms, message_cost_us=cost))
                for cost in costs]
            section["coalescing"] = [asyncio.run(latency(
                core, args.smooth_sessions, args.rate, 1000 / args.rate, args.seconds, c / 1e3,
                args.interrupts // 4, args.interrupt_every_ms,
                message_cost_us=args.coalesce_message_cost_us))
                for c in (0.0, args.coalesce_ms)]
        result[name] = section

    def summary(section: dict) -> dict:
        lat = section["latency"]
        return {
            "single_session_tokens_per_s": max(
                t["tokens_per_s"] for t in section["throughput"].values()),
            "single_session_tokens_per_s_frame_per_write":
                section["throughput"]["frame_per_write"]["tokens_per_s"],
            "sessions": lat["sessions"],
            "latency_ms_p50": lat["latency_ms_p50"],
            "latency_ms_p99": lat["latency_ms_p99"],
            "interrupt_ms_p50": lat["interrupt_ms_p50"],
            "interrupt_ms_p99": lat["interrupt_ms_p99"],
            "loop_cpu_fraction": lat["loop_cpu_fraction"],
        }

    result.update(summary(result["cython"]))
    result["python_twin"] = summary(result["python"])
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
