"""Exec output throughput: how fast a command's stdout reaches a client through the daemon.

Starts a real `corral daemon`, creates one sandbox and runs `head -c BYTES /dev/zero` in it
through `Sandboxes.Exec` (the Python client, one reader that keeps up), RUNS times. For each
run: bytes the client received (short of BYTES means output was dropped), seconds from the
request to the exit event, and MB/s (10^6 bytes) of what arrived. With --binary the command
is `head -c BYTES /dev/urandom` and the client checks nothing but the count (the kernel's
random generator then bounds the rate); with --allow-loss the request allows loss (no flow
control: the command never waits, a reader too slow for it loses output).

Prints one JSON object: {"bytes", "runs": [{"received", "seconds", "mb_s"}], "worst_mb_s",
"best_mb_s", "complete_runs"}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import harness

from corral.runtime.client import Client


def one_run(client: Client, sandbox_id: str, size: int, source: str, **kw) -> dict:
    received = 0
    start = time.perf_counter()
    for event in client.exec(sandbox_id, ["head", "-c", str(size), source], **kw):
        if event.WhichOneof("event") == "output" and event.output.stream == 1:
            received += len(event.output.batch.text)
    seconds = time.perf_counter() - start
    return {"received": received, "seconds": round(seconds, 3),
            "mb_s": round(received / seconds / 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=256 << 20, help="output per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--binary", action="store_true", help="/dev/urandom, not /dev/zero")
    parser.add_argument("--allow-loss", action="store_true",
                        help="ExecRequest.allow_loss: no flow control (what arrives may be less)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="corral-bench-exec-")
    proc, socket = harness.start_daemon(root)
    try:
        client = Client.connect(socket=socket)
        for _ in range(100):  # the socket exists a moment before the server answers
            try:
                sandbox = client.create_sandbox()
                break
            except Exception:  # noqa: BLE001 - not serving yet
                time.sleep(0.1)
        source = "/dev/urandom" if args.binary else "/dev/zero"
        kw = {"allow_loss": True} if args.allow_loss else {}
        runs = [one_run(client, sandbox.id, args.bytes, source, **kw) for _ in range(args.runs)]
        client.destroy_sandbox(sandbox.id)
        client.close()
    finally:
        harness.stop_daemon(proc)
        shutil.rmtree(root, ignore_errors=True)
    rates = [r["mb_s"] for r in runs]
    print(json.dumps({"bytes": args.bytes, "source": source, "allow_loss": args.allow_loss,
                      "runs": runs,
                      "worst_mb_s": min(rates), "best_mb_s": max(rates),
                      "complete_runs": sum(r["received"] == args.bytes for r in runs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
