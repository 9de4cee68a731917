"""Token core throughput: decode + replay log + take(), compiled core against its Python twin.

Both implementations get the same input in the same run: a stream of protocol v1 TOKEN frames
(average 4 bytes of text per token) fed in fixed-size reads, with 1 and then 4 subscribers
draining every batch after each read, the way the runtime's adapter drives the core. Then
take() alone: nanoseconds per call draining a log that holds the whole input with a PROGRESS
event after every 8th token (the event path too), in 64 KiB and in 256-byte batches.

    python bench/stream_core.py --json      # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import random
import struct
import sys
import time

import harness

# average 4 bytes: lengths 1..7 uniformly; a few multi-byte characters keep UTF-8 checks honest
_ALPHABET = "abcdefghijklmnopqrstuvwxyz      ,.é"


def make_input(tokens: int, seed: int = 1) -> tuple[bytes, int]:
    """(the frames, the total UTF-8 text bytes) for `tokens` TOKEN frames."""
    rng = random.Random(seed)
    parts = []
    text_bytes = 0
    pack = struct.Struct("<IB").pack
    for _ in range(tokens):
        n = rng.randint(1, 7)
        text = "".join(rng.choice(_ALPHABET) for _ in range(n)).encode()[:n]
        while True:  # cutting at n bytes may split the 2-byte "é": trim to a whole character
            try:
                text.decode()
                break
            except UnicodeDecodeError:
                text = text[:-1]
        parts.append(pack(len(text), 1) + text)
        text_bytes += len(text)
    return b"".join(parts), text_bytes


def run_once(impl, data: bytes, subscribers: int, read_size: int, take_bytes: int,
             log_bytes: int) -> tuple[float, int]:
    """Seconds to push all of `data` through one stream; also the batches taken."""
    stream = impl.TokenStream("frames", log_bytes=log_bytes)
    cursors = [stream.subscribe() for _ in range(subscribers)]
    view = memoryview(data)
    feed, take = stream.feed, stream.take
    batches = 0
    start = time.perf_counter()
    for pos in range(0, len(data), read_size):
        feed(view[pos:pos + read_size])
        for cursor in cursors:
            while take(cursor, take_bytes) is not None:
                batches += 1
    elapsed = time.perf_counter() - start
    stats = stream.statistics()
    if stats.errors or any(c.next_seq != stats.next_seq for c in cursors):
        raise RuntimeError(f"{impl.IMPLEMENTATION}: the run lost data: {stats}")
    return elapsed, batches


def with_events(data: bytes, event_frame: bytes, every: int = 8) -> bytes:
    """`data` (TOKEN frames) with event_frame after every `every`-th frame."""
    parts = []
    pos = 0
    count = 0
    while pos < len(data):
        end = pos + 5 + struct.unpack_from("<I", data, pos)[0]
        parts.append(data[pos:end])
        count += 1
        if count % every == 0:
            parts.append(event_frame)
        pos = end
    return b"".join(parts)


def take_cost_ns(impl, data: bytes, max_bytes: int, repeats: int) -> float:
    """Nanoseconds per take() draining a log that holds all of `data`, best of `repeats`."""
    stream = impl.TokenStream("frames", log_bytes=1 << 30)
    stream.feed(data)
    best = float("inf")
    for _ in range(repeats):
        cursor = stream.subscribe()
        take = stream.take
        calls = 0
        start = time.perf_counter()
        while take(cursor, max_bytes) is not None:
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
        stream.unsubscribe(cursor)
    return best * 1e9


def measure(impl, data: bytes, tokens: int, subscribers: int, repeats: int, **kw) -> dict:
    times = []
    batches = 0
    for _ in range(repeats):
        elapsed, batches = run_once(impl, data, subscribers, **kw)
        times.append(elapsed)
    best = min(times)
    return {"seconds": best, "tokens_per_s": tokens / best, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--read-size", type=int, default=64 << 10,
                        help="bytes per feed() call (one read from the agent's pipe)")
    parser.add_argument("--take-bytes", type=int, default=64 << 10,
                        help="max_bytes of each take() (one gRPC message)")
    parser.add_argument("--log-bytes", type=int, default=8 << 20)
    parser.add_argument("--repeats", type=int, default=5, help="best of N for the compiled core")
    parser.add_argument("--python-repeats", type=int, default=1)
    args = parser.parse_args(argv)

    data, text_bytes = make_input(args.tokens)
    kw = {"read_size": args.read_size, "take_bytes": args.take_bytes,
          "log_bytes": args.log_bytes}
    impls = {"python": importlib.import_module("corral.ext._stream_py")}
    try:
        impls["cython"] = importlib.import_module("corral.ext._stream")
    except ImportError as exc:
        print(f"corral.ext._stream is not built ({exc}); run `make ext`", file=sys.stderr)
        return 1

    result: dict = {
        "tokens": args.tokens,
        "text_bytes": text_bytes,
        "wire_bytes": len(data),
        "avg_token_bytes": round(text_bytes / args.tokens, 3),
        "read_size": args.read_size,
        "take_bytes": args.take_bytes,
        "log_bytes": args.log_bytes,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    for name, impl in impls.items():
        repeats = args.repeats if name == "cython" else args.python_repeats
        for subs, suffix in ((1, ""), (4, "_4subs")):
            m = measure(impl, data, args.tokens, subs, repeats, **kw)
            result[f"{name}_tokens_per_s{suffix}"] = round(m["tokens_per_s"])
            result[f"{name}_text_bytes_per_s{suffix}"] = round(m["tokens_per_s"] * text_bytes
                                                               / args.tokens)
            result[f"{name}_wire_bytes_per_s{suffix}"] = round(m["tokens_per_s"] * len(data)
                                                               / args.tokens)
            result[f"{name}_batches{suffix}"] = m["batches"]
    # The interactive regime: a read holds only a few frames (64 bytes, about 7 tokens) and
    # the subscriber takes after every read, so per-call overhead dominates.
    small = dict(kw, read_size=64)
    for name, impl in impls.items():
        repeats = args.repeats if name == "cython" else args.python_repeats
        m = measure(impl, data, args.tokens, 1, repeats, **small)
        result[f"{name}_tokens_per_s_small_reads"] = round(m["tokens_per_s"])
    mixed = with_events(data, impls["python"].encode_frame(3, b'{"step": 1}'))  # PROGRESS
    for name, impl in impls.items():
        repeats = args.repeats if name == "cython" else args.python_repeats
        for max_bytes, suffix in ((64 << 10, "64k"), (256, "256")):
            result[f"{name}_take_ns_{suffix}"] = round(take_cost_ns(impl, mixed, max_bytes,
                                                                    repeats))
    result["ratio"] = round(result["cython_tokens_per_s"] / result["python_tokens_per_s"], 1)
    result["ratio_4subs"] = round(
        result["cython_tokens_per_s_4subs"] / result["python_tokens_per_s_4subs"], 1)
    result["ratio_small_reads"] = round(
        result["cython_tokens_per_s_small_reads"] / result["python_tokens_per_s_small_reads"], 1)
    harness.emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
