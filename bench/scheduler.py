"""Deep-task scheduler: durable submissions, placement decisions, submit -> running latency.

Everything runs on this machine against daemons this script starts (fresh state dirs,
private sockets) and stops; the Ray figure against a local Ray cluster it starts.

submissions   N submissions through gRPC, each acknowledged only after the task is
              committed (WAL, synchronous=FULL, group commit): `submissions_per_s` on one
              Tasks.SubmitStream (one ack message per task, in order, after its commit), and
              `submissions_per_s_unary` with unary Submit calls (grpc.aio client, --concurrency
              in flight; a Python unary call costs the daemon ~0.3-0.5 ms of CPU in gRPC
              alone). The only node is cordoned first, so nothing runs: the figure is the
              durable admission path alone. Peer: the same rows committed one transaction
              per task in-process (what group commit saves), `sqlite_one_commit_each_per_s`.
placement     NodeRegistry.place() with 1,000 simulated nodes (10 pools x 5 zones x 3
              accelerator kinds; random free resources), selectors of 0-3 labels; each
              decision is timed alone, p50/p99 in microseconds. Peer: a linear scan of every
              node without the label index (`placement_us_p50_1000_nodes_linear_scan`).
local         submit `true` on a daemon with one local node, --latency-runs times in turn;
              submit -> running = the runner's start time (sandbox up, command about to be
              exec'd) - the client's clock before Submit. p50 in milliseconds.
ray           the same on a Ray executor node of a local Ray cluster (head + 1 node on
              127.0.0.1); skipped (null) when Ray is not installed.

    bench/scheduler.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Daemon:
    def __init__(self, config: str):
        self.root = tempfile.mkdtemp(prefix="cbench-sched-")
        self.socket = os.path.join(self.root, "corral.sock")
        with open(os.path.join(self.root, "corral.toml"), "w") as f:
            f.write(config)
        self.log = open(os.path.join(self.root, "daemon.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.runtime.cli", "daemon", "--socket", self.socket,
             "--state", os.path.join(self.root, "state"), "--config",
             os.path.join(self.root, "corral.toml")],
            stdout=self.log, stderr=subprocess.STDOUT)
        from corral.runtime.client import Client, ClientError

        end = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(open(os.path.join(self.root, "daemon.log")).read())
            if os.path.exists(self.socket):
                try:
                    self.client = Client.connect(socket=self.socket)
                    self.client.list_nodes()
                    break
                except ClientError:
                    pass
            if time.monotonic() > end:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.1)

    def stop(self):
        self.client.close()
        if self.proc.poll() is not None:  # it died under the benchmark: say why
            self.log.close()
            with open(os.path.join(self.root, "daemon.log")) as f:
                sys.stderr.write(f"the daemon exited with {self.proc.returncode}:\n"
                                 f"{f.read()[-4000:]}")
            raise RuntimeError(f"the daemon died; its state is kept in {self.root}")
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def bench_submissions(n: int, concurrency: int) -> dict:
    d = Daemon('[[nodes]]\nname = "bench"\nresources = { cpu = 1 }\n')
    try:
        d.client.cordon_node("bench")
        import grpc

        from corral.v1 import task_pb2

        req = task_pb2.SubmitTaskRequest(spec=task_pb2.TaskSpec(argv=["true"],
                                                                resources={"cpu": 1}))

        def method(channel, shape: str, name: str, reply):
            """The raw Tasks.<name> of channel; shape is grpc's (unary_unary, stream_stream)."""
            return getattr(channel, shape)(
                f"/corral.v1.Tasks/{name}",
                request_serializer=task_pb2.SubmitTaskRequest.SerializeToString,
                response_deserializer=reply.FromString)

        async def unary(channel) -> float:
            submit = method(channel, "unary_unary", "Submit", task_pb2.Task)
            await submit(req)  # warm
            left = n

            async def worker():
                nonlocal left
                while left > 0:
                    left -= 1
                    await submit(req)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0

        async def stream(channel) -> float:
            submit = method(channel, "stream_stream", "SubmitStream", task_pb2.SubmitAck)

            async def requests():
                for _ in range(n):
                    yield req

            t0 = time.perf_counter()
            acks = 0
            async for ack in submit(requests()):
                assert ack.task_id and not ack.error, ack
                acks += 1
            elapsed = time.perf_counter() - t0
            assert acks == n
            return elapsed

        async def on_channel(drive) -> float:
            """What drive(channel) returns, on a channel of its own to the daemon."""
            channel = grpc.aio.insecure_channel(f"unix:{d.socket}")
            try:
                return await drive(channel)
            finally:
                await channel.close()

        elapsed_unary = asyncio.run(on_channel(unary))
        elapsed_stream = asyncio.run(on_channel(stream))
        tasks = d.client.list_tasks(limit=2 * n + 10)
        assert len(tasks) == 2 * n + 1, len(tasks)
    finally:
        d.stop()
    return {"submissions_per_s": round(n / elapsed_stream),
            "submissions_per_s_unary": round(n / elapsed_unary), "submissions": n,
            "unary_concurrency": concurrency}


def bench_sqlite_peer(n: int) -> float:
    from corral.runtime.tasks.model import DeepTask, TaskSpec
    from corral.runtime.tasks.store import _INSERT, _connect, _mutable_values

    root = tempfile.mkdtemp(prefix="cbench-sqlite-")
    try:
        conn = _connect(os.path.join(root, "tasks.db"))
        spec = TaskSpec(argv=("true",))
        t0 = time.perf_counter()
        for i in range(n):
            t = DeepTask(id=f"task-{i}", seq=i, tenant="t", spec=spec, submitted_at=1.0)
            with conn:
                # the row TaskStore.insert writes (runtime/tasks/store.py), one commit each
                conn.execute(_INSERT, (t.id, t.seq, t.tenant, spec.to_json(), t.submitted_at,
                                       t.request_id, t.parent_ref, *_mutable_values(t)))
        elapsed = time.perf_counter() - t0
        conn.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return round(n / elapsed)


def bench_placement(decisions: int) -> dict:
    from corral.runtime.tasks.nodes import Node, NodeConfig, NodeRegistry

    rng = random.Random(5)
    reg = NodeRegistry()
    pools = [f"p{i}" for i in range(10)]
    zones = [f"z{i}" for i in range(5)]
    accels = ["h200", "b200", "none"]
    for i in range(1000):
        labels = {"pool": rng.choice(pools), "zone": rng.choice(zones),
                  "accelerator": rng.choice(accels)}
        node = Node.from_config(NodeConfig(f"n{i}", labels, {"cpu": 64, "memory": 512e9,
                                                             "accelerator.h200": 8}))
        node.free["cpu"] = rng.choice([0, 1, 2, 8, 64])
        reg.add(node)
    selectors = []
    for _ in range(decisions):
        k = rng.randint(0, 3)
        sel = dict(rng.sample([("pool", rng.choice(pools)), ("zone", rng.choice(zones)),
                               ("accelerator", rng.choice(accels))], k))
        selectors.append((sel, {"cpu": rng.choice([1, 2, 4])}))

    def linear(selector, resources):
        for node in reg.nodes.values():
            if (node.schedulable and all(node.labels.get(k) == v for k, v in selector.items())
                    and node.fits(resources)):
                return node
        return None

    out = {}
    for name, fn in (("indexed", reg.place), ("linear_scan", linear)):
        times = []
        found = 0
        clock = time.perf_counter_ns
        for sel, res in selectors:
            t0 = clock()
            node = fn(sel, res)
            times.append(clock() - t0)
            found += node is not None
        out[name] = (statistics.median(times) / 1000, _pct(times, 0.99) / 1000, found)
    return {
        "placement_us_p50_1000_nodes": round(out["indexed"][0], 2),
        "placement_us_p99_1000_nodes": round(out["indexed"][1], 2),
        "placement_us_p50_1000_nodes_linear_scan": round(out["linear_scan"][0], 2),
        "placement_decisions": decisions,
        "placement_found": out["indexed"][2],
    }


def _submit_to_running(client, runs: int, **kw) -> list[float]:
    from corral.runtime.tasks.states import TaskState

    lat = []
    for _ in range(runs):
        t0 = time.time()
        task = client.submit_task(["true"], **kw)
        end = time.monotonic() + 120
        while True:
            t = client.get_task(task.id)
            if t.state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED):
                break
            if time.monotonic() > end:
                raise RuntimeError(f"task {task.id} stuck: {t.state} {t.reason}")
            time.sleep(0.01)
        if t.state != TaskState.SUCCEEDED:
            raise RuntimeError(f"task {task.id}: {t.reason}")
        lat.append((t.started_at - t0) * 1000)
    return lat


def bench_local(runs: int) -> dict:
    d = Daemon('[[nodes]]\nname = "local"\nresources = { cpu = 1 }\n')
    try:
        lat = _submit_to_running(d.client, runs, resources={"cpu": 1})
    finally:
        d.stop()
    return {"submit_to_running_ms_p50_local": round(statistics.median(lat), 1),
            "submit_to_running_ms_p99_local": round(_pct(lat, 0.99), 1)}


def bench_ray(runs: int) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"submit_to_running_ms_p50_ray": None, "ray": "not installed (corral[ray])"}
    from ray.cluster_utils import Cluster

    from corral.runtime.tasks.ray_executor import NODE_LABEL, ray_environment

    ray_environment()
    small = dict(num_cpus=1, object_store_memory=80 << 20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        small, num_cpus=0, include_dashboard=False, labels={NODE_LABEL: "head"}))
    cluster.add_node(**small, labels={NODE_LABEL: "ray-1"})
    cluster.wait_for_nodes()
    session_dir = cluster.head_node.get_session_dir_path()
    try:
        d = Daemon(f'ray_address = "{cluster.address}"\n[[nodes]]\nname = "ray-1"\n'
                   'executor = "ray"\nresources = { cpu = 1 }\n')
        try:
            _submit_to_running(d.client, 1)  # the actor starts on first use
            lat = _submit_to_running(d.client, runs, resources={"cpu": 1})
        finally:
            d.stop()
    finally:
        cluster.shutdown()
        shutil.rmtree(session_dir, ignore_errors=True)
    return {"submit_to_running_ms_p50_ray": round(statistics.median(lat), 1),
            "submit_to_running_ms_p99_ray": round(_pct(lat, 0.99), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--submissions", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--decisions", type=int, default=20000)
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    harness.require_root("the daemon makes sandboxes")
    result: dict = {"bench": "scheduler", "cpus": os.cpu_count()}
    result.update(bench_placement(args.decisions))
    result.update(bench_submissions(args.submissions, args.concurrency))
    result["sqlite_one_commit_each_per_s"] = bench_sqlite_peer(min(args.submissions, 2000))
    result.update(bench_local(args.latency_runs))
    if args.no_ray:
        result["submit_to_running_ms_p50_ray"] = None
    else:
        result.update(bench_ray(args.latency_runs))
    harness.emit(result, args.json, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
