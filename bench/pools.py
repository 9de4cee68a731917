"""Warm pools: Create through a real daemon that hits a pool, against a cold Create.

Starts `corral daemon` (root: it makes sandboxes) with one warm pool of size 2 serving
tenant "pooled", and --metrics on loopback. Each round times, in rotating order, one
Create of tenant "pooled" (a pool hit: the pool's class exactly) and one of tenant "cold"
(the same spec, a tenant the pool does not serve: spawned on the spot), at the client over
the unix socket. The daemon's own time of each Create is the growth of its
corral_sandbox_create_seconds histogram's sum across that one call (scraped before and
after, outside the timed region). After each round both sandboxes are destroyed and the
bench waits for the pool's refill, so no fill runs while a Create is timed.

  bench/pools.py [--pool-iterations N] [--pool-warmup N] [--secrets] [--quick] [--json]

Keys: pool_create_ms_p50, cold_create_ms_p50 (client), pool_create_daemon_ms_p50,
cold_create_daemon_ms_p50 (daemon), their p99, and ratio_cold_vs_pool_p50. Target: a pool
hit <= 1 ms p50 at the daemon. bench/spawn.py --pools adds the same keys to its object.

--secrets: the pool is of egress class "secrets" and every Create binds a secret from the
daemon's store (both tenants have it), so a hit also reads the secret, makes the sandbox's
CA, puts it in its trust directory and rebinds its egress link; the keys are then
pool_secret_create_* and cold_secret_create_* (ratio_cold_vs_pool_secret_p50).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

import harness

SIZES = {
    "pool_iterations": harness.Size(50, 5, "rounds of one pool hit and one cold create"),
    "pool_warmup": harness.Size(3, 1, "rounds run first and not counted"),
}
#: The pool's class, as a Create asks for it.
SPEC = {"memory_bytes": 128 << 20, "pids_max": 64, "tmp_bytes": 8 << 20, "cpus": 1.0}
#: --secrets: the binding every Create asks for, and the value both tenants' stores hold.
SECRET = {"secrets": [{"name": "BENCH_TOKEN", "hosts": ["api.example.com"]}]}
SECRET_VALUE = "bench-" + "0" * 32
CONFIG = """
pool_refill_per_s = 50
{secrets}
[tenants.pooled]
[tenants.cold]
[pools.bench]
size = 2
memory = "128M"
pids = 64
tmp = "8M"
cpus = 1
tenants = ["pooled"]
egress = "{egress}"
"""
#: Seconds the bench waits for the pool to refill before it gives up.
REFILL_WAIT_S = 60.0


def _p(values: list[float], pct: float) -> float:
    ranked = sorted(values)
    return round(ranked[max(0, -(-len(ranked) * pct // 100) - 1)], 3)


def _create_seconds_sum(port: int) -> float:
    """corral_sandbox_create_seconds_sum of the native backend, scraped now."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "corral_sandbox_create_seconds_sum"
                    and sample.labels.get("backend") == "native"):
                return sample.value
    return 0.0


class _Records:
    """The daemon's audit log, read-only: its start record and the pool's fills."""

    def __init__(self, state: str):
        self.path = os.path.join(state, "audit.db")

    def count(self, kind: str) -> int:
        return len(self.query(kind))

    def query(self, kind: str) -> list:
        from corral.runtime.audit import AuditLog

        log = AuditLog.open(self.path, readonly=True)
        try:
            return log.query(kind=kind, limit=10_000)
        finally:
            log.close()

    def wait_for(self, kind: str, n: int) -> None:
        deadline = time.monotonic() + REFILL_WAIT_S
        while self.count(kind) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {n} {kind} records after {REFILL_WAIT_S}s")
            time.sleep(0.01)


def _timed_create(client, port: int, spec: dict) -> tuple[str, float, float]:
    """(sandbox id, client ms, daemon ms) of one Create."""
    before = _create_seconds_sum(port)
    t0 = time.perf_counter()
    sandbox = client.create_sandbox(**spec)
    client_ms = (time.perf_counter() - t0) * 1e3
    return sandbox.id, client_ms, (_create_seconds_sum(port) - before) * 1e3


def _config(root: str, secrets: bool) -> str:
    """The daemon's config file (and, for --secrets, its store with both tenants' value)."""
    section = ""
    if secrets:
        store = os.path.join(root, "secrets")
        for tenant in ("pooled", "cold"):
            os.makedirs(os.path.join(store, tenant))
            path = os.path.join(store, tenant, SECRET["secrets"][0]["name"])
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(SECRET_VALUE)
        section = f'[secrets]\ndir = "{store}"'
    config = os.path.join(root, "corral.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(secrets=section, egress="secrets" if secrets else "none"))
    os.chmod(config, 0o600)
    return config


def pool_columns(iterations: int, warmup: int, secrets: bool = False) -> dict:
    """The pool keys (module docstring), from a daemon of the bench's own."""
    from corral.runtime.client import Client

    root = tempfile.mkdtemp(prefix="corral-bench-pools-")
    config = _config(root, secrets)
    spec = {**SPEC, **SECRET} if secrets else SPEC
    proc, socket = harness.start_daemon(root, "--config", config, "--metrics", "127.0.0.1:0")
    records = _Records(os.path.join(root, "state"))
    times: dict[str, list[float]] = {k: [] for k in ("pool", "cold", "pool_d", "cold_d")}
    try:
        records.wait_for("daemon.start", 1)
        port = json.loads(records.query("daemon.start")[-1].detail_json)["metrics_port"]
        clients = {"pool": Client.connect(socket=socket, tenant="pooled"),
                   "cold": Client.connect(socket=socket, tenant="cold")}
        fills = 2
        records.wait_for("sandbox.pool.fill", fills)
        for i in range(warmup + iterations):
            order = ("pool", "cold") if i % 2 == 0 else ("cold", "pool")
            made = []
            for kind in order:
                sandbox_id, client_ms, daemon_ms = _timed_create(clients[kind], port, spec)
                made.append((kind, sandbox_id))
                if i >= warmup:
                    times[kind].append(client_ms)
                    times[kind + "_d"].append(daemon_ms)
            for kind, sandbox_id in made:
                clients[kind].destroy_sandbox(sandbox_id)
            fills += 1
            records.wait_for("sandbox.pool.fill", fills)  # refilled before the next round
        hits = sum(1 for r in records.query("sandbox.create")
                   if json.loads(r.detail_json).get("pool") == "bench")
        for c in clients.values():
            c.close()
    finally:
        harness.stop_daemon(proc)
        shutil.rmtree(root, ignore_errors=True)
    if hits != warmup + iterations:
        raise RuntimeError(f"{hits} pool hits recorded for {warmup + iterations} rounds")
    result = {}
    tag = "_secret" if secrets else ""
    for kind, name in (("pool", f"pool{tag}_create"), ("cold", f"cold{tag}_create")):
        result[f"{name}_ms_p50"] = round(statistics.median(times[kind]), 3)
        result[f"{name}_ms_p99"] = _p(times[kind], 99)
        result[f"{name}_daemon_ms_p50"] = round(statistics.median(times[kind + "_d"]), 3)
        result[f"{name}_daemon_ms_p99"] = _p(times[kind + "_d"], 99)
    result[f"ratio_cold_vs_pool{tag}_p50"] = round(result[f"cold{tag}_create_ms_p50"]
                                                   / result[f"pool{tag}_create_ms_p50"], 1)
    result["pool_iterations"] = iterations
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_sizes(parser, SIZES)
    parser.add_argument("--secrets", action="store_true",
                        help="a pool of egress class secrets; every Create binds a secret")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    harness.apply_quick(args, SIZES)
    harness.require_root("the daemon makes sandboxes")
    if args.pool_iterations < 1 or args.pool_warmup < 0:
        parser.error("--pool-iterations must be at least 1, --pool-warmup at least 0")
    harness.emit(pool_columns(args.pool_iterations, args.pool_warmup, args.secrets),
                 args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
