"""A hostile tenant, run as its own process beside a well-behaved one (issue 18).

    python -m tests.adversarial.hostile --target 127.0.0.1:PORT --token TOKEN --seconds N

Every attack runs on its own thread until the time is up (or SIGTERM comes), then
everything it made is destroyed and one JSON line of counts is printed. Attacks (each is
a finding of the issue):

* fifo      mkfifo in its sandbox, then WriteFile onto the FIFO, again and again
* unauth    calls with an unknown bearer token (flooding the denial path)
* oversized creates and execs with fields at and over every size limit
* burst     concurrent creates past its sandbox quota, more while it is full, destroys
* openmany  OpenMany starts with 1 MB fields on a stream it never reads

It runs at nice 10: the test is about the daemon's fairness to other tenants, not about
this 2-core machine's CPU scheduler (the attacker's client work would otherwise compete
with the daemon for the same cores). The attacker never needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter

from corral.runtime.client import Client, ClientError

#: Seconds the burst attack holds its filled quota before giving it back and bursting again.
BURST_HOLD_S = 1.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--attacks", default="fifo,unauth,oversized,burst,openmany",
                    help="comma-separated subset of the attacks to run")
    args = ap.parse_args()
    os.nice(10)
    counts: Counter = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds
    ended = threading.Event()
    # SIGTERM ends the attacks early, as the time running out would (cleanup still runs)
    signal.signal(signal.SIGTERM, lambda *_: ended.set())

    def running() -> bool:
        return not ended.is_set() and time.monotonic() < stop
    made: list[str] = []

    def tally(name: str, outcome: str) -> None:
        with lock:
            counts[f"{name}.{outcome}"] += 1

    def client() -> Client:
        return Client.connect(target=args.target, token=args.token)

    def attempt(name: str, fn) -> None:
        try:
            fn()
            tally(name, "ok")
        except ClientError as exc:
            tally(name, exc.code.name)

    def fifo() -> None:
        c = client()
        sb = placed(c)
        list(c.exec(sb.id, ["mkfifo", "/workspace/input.txt"]))
        while running():
            attempt("fifo", lambda: c.write_file(sb.id, "input.txt", b"x" * 100))

    def unauth() -> None:
        bad = Client.connect(target=args.target, token="not-a-token-0123456789abcdef")
        while running():
            attempt("unauth", bad.list_sandboxes)

    def placed(c: Client):
        """A sandbox of this tenant's, once the burst leaves a place in the quota (the
        threads share it: a refused first create must not end the attack)."""
        while True:
            try:
                sb = c.create_sandbox()
            except ClientError as exc:
                if exc.code.name != "RESOURCE_EXHAUSTED":
                    raise
                time.sleep(0.05)
                continue
            made.append(sb.id)
            return sb

    def oversized() -> None:
        c = client()
        sb = placed(c)
        big = "x" * (1 << 20)
        while running():
            attempt("oversized.env", lambda: c.create_sandbox(env={"A": big}))
            attempt("oversized.argv", lambda: list(c.exec(sb.id, ["true"] + ["y" * 1000] * 300)))
            attempt("oversized.path", lambda: c.write_file(sb.id, "p" * 100_000, b"x"))
            time.sleep(0.01)

    def burst() -> None:
        """Fill the quota at once (8 concurrent creates for 4 places), hold it for a while
        hammering the refused create, then give it back and fill it again."""
        c = client()
        while running():
            ids: list[str] = []

            def one(ids=ids):
                try:
                    ids.append(c.create_sandbox().id)
                    tally("burst", "ok")
                except ClientError as exc:
                    tally("burst", exc.code.name)

            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            held_until = time.monotonic() + BURST_HOLD_S
            while running() and time.monotonic() < held_until:
                one()
            for sid in ids:
                with contextlib.suppress(ClientError):
                    c.destroy_sandbox(sid)

    def openmany() -> None:
        c = client()
        big = "z" * (1 << 20)
        mux = c.open_many()  # never read
        n = 0
        while running():
            n += 1
            if mux._call.done():  # the daemon ended it: open another, as a flood would
                tally("openmany", "reopened")
                mux = c.open_many()
            mux.start(f"r{n}", ["true"], hostname=big)
            tally("openmany", "sent")
            time.sleep(0.002)
        mux.close()

    known = {a.__name__: a for a in (fifo, unauth, oversized, burst, openmany)}
    attacks = [known[name] for name in args.attacks.split(",")]
    threads = [threading.Thread(target=a, name=a.__name__) for a in attacks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 60)
    c = client()
    for sb in c.list_sandboxes():
        with contextlib.suppress(ClientError):
            c.destroy_sandbox(sb.id)
    print(json.dumps(dict(counts), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
