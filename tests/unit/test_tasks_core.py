"""Deep-task core without root: the transition table, the SQLite store, placement."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from corral.runtime.tasks import states
from corral.runtime.tasks.model import DeepTask, TaskSpec, Unsatisfiable, parse_pairs
from corral.runtime.tasks.nodes import Node, NodeConfig, NodeRegistry
from corral.runtime.tasks.states import TaskState
from corral.runtime.tasks.store import TaskStore
from corral.sandbox.errors import InvalidSpec, InvalidTransition
from corral.sandbox.spec import SandboxSpec

S = TaskState


# -- transitions ---------------------------------------------------------------------------


@pytest.mark.parametrize("from_,to", [
    (S.QUEUED, S.PLACED), (S.PLACED, S.RUNNING), (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED), (S.RUNNING, S.RETRYING), (S.RETRYING, S.PLACED),
    (S.QUEUED, S.CANCELLED), (S.RUNNING, S.CANCELLED), (S.PLACED, S.QUEUED),
])
def test_legal_moves(from_, to):
    assert states.check(from_, to) is to


@pytest.mark.parametrize("from_,to", [
    (S.QUEUED, S.RUNNING), (S.SUCCEEDED, S.RUNNING), (S.FAILED, S.RETRYING),
    (S.CANCELLED, S.QUEUED), (S.RUNNING, S.QUEUED), (S.RETRYING, S.RUNNING),
    (S.QUEUED, S.SUCCEEDED),
])
def test_illegal_moves_raise(from_, to):
    with pytest.raises(InvalidTransition, match=rf"^illegal transition {from_.name} -> {to.name}$"):
        states.check(from_, to)


def test_terminal_states_have_no_way_out():
    for s in states.TERMINAL:
        assert states.TRANSITIONS[s] == frozenset()
    assert set(states.TRANSITIONS) == set(TaskState)


# -- spec validation -------------------------------------------------------------------------


def test_spec_validation_names_fields():
    with pytest.raises(InvalidSpec, match=r"^spec\.priority: "):
        TaskSpec(argv=("x",), priority=-1)
    with pytest.raises(InvalidSpec, match=r"^spec\.selector: "):
        TaskSpec(argv=("x",), selector={"Bad Key": "v"})
    with pytest.raises(InvalidSpec, match=r"^spec\.selector: "):
        TaskSpec(argv=("x",), selector={"pool": ""})
    with pytest.raises(InvalidSpec, match=r"^spec\.resources\[cpu\]: "):
        TaskSpec(argv=("x",), resources={"cpu": -2})
    with pytest.raises(InvalidSpec, match=r"^spec\.argv: "):
        TaskSpec(argv=())
    with pytest.raises(InvalidSpec, match=r"^spec\.files: "):
        TaskSpec(argv=("x",), files={"../escape": b""})
    with pytest.raises(InvalidSpec, match=r"^spec\.selector: 'novalue' is not KEY=VALUE$"):
        parse_pairs(["novalue"], "spec.selector")


def test_spec_json_round_trip():
    spec = TaskSpec(argv=("python3", "-c", "1"),
                    sandbox=SandboxSpec(memory_bytes=1 << 28, timeout_s=5.0,
                                        allow_net=("example.com:443",), env=(("A", "1"),)),
                    selector={"pool": "deep"}, resources={"cpu": 1.5}, priority=7, retries=2,
                    max_runtime_s=60, files={"a/b.py": b"\x00\xff"})
    assert TaskSpec.from_json(spec.to_json()) == spec


#: A row's spec as the daemon stored it before tasks carried a SandboxSpec: the sandbox
#: was SandboxSpec keyword arguments (and never had allow_net or timeout_s).
OLD_ROW_SPEC = ('{"argv":["sh","-c","true"],"files":{},"max_runtime_s":0.0,"priority":0,'
                '"resources":{"cpu":1.0,"memory":536870912.0},"retries":0,"sandbox":{'
                '"backend":"docker","cpus":1.0,"env":[["A","1"],["B","x=y"]],"hostname":"job",'
                '"memory_bytes":536870912,"pids_max":256,"profile":"default",'
                '"tmp_bytes":67108864},"selector":{}}')


def test_a_spec_stored_by_the_old_code_still_loads():
    spec = TaskSpec.from_json(OLD_ROW_SPEC)
    assert spec.sandbox == SandboxSpec(backend="docker", env=(("A", "1"), ("B", "x=y")),
                                       hostname="job")
    assert TaskSpec.from_json(spec.to_json()) == spec  # and is written back in the new form


def test_a_stored_sandbox_field_that_is_no_spec_field_is_refused():
    text = OLD_ROW_SPEC.replace('"hostname":"job"', '"hostnmae":"job"')
    with pytest.raises(InvalidSpec, match=r"^hostnmae: is not a sandbox spec field$"):
        TaskSpec.from_json(text)


def test_attempt_plan_carries_the_whole_sandbox_spec():
    from corral.runtime.tasks.runner import AttemptPlan

    sandbox = SandboxSpec(timeout_s=2.5, allow_net=("10.0.0.0/8",), cpus=0.5)
    plan = AttemptPlan(task_id="t", attempt=1, argv=["true"], sandbox=sandbox)
    assert AttemptPlan.from_json(plan.to_json()).sandbox == sandbox


def test_task_specs_keep_every_sandbox_field_through_the_api():
    """allow_net and command_timeout_s were once dropped on the way in (and image with
    them): the task's sandbox is the SandboxSpec the request asked for, field by field."""
    from corral.runtime.api.sandboxes import spec_from_proto as sandbox_from_proto
    from corral.runtime.api.tasks import spec_from_proto, spec_to_proto
    from corral.v1 import sandbox_pb2, task_pb2

    asked = sandbox_pb2.SandboxSpec(allow_net=["example.com:443"], command_timeout_s=7.5,
                                    memory_bytes=1 << 28, env={"A": "1"}, hostname="job")
    spec = spec_from_proto(task_pb2.TaskSpec(argv=["true"], sandbox=asked))
    assert spec.sandbox == sandbox_from_proto(asked)
    assert (spec.sandbox.allow_net, spec.sandbox.timeout_s) == (("example.com:443",), 7.5)
    shown = spec_to_proto(spec).sandbox
    assert (list(shown.allow_net), shown.command_timeout_s) == (["example.com:443"], 7.5)


def test_held_resources_become_the_sandbox_limits():
    from corral.runtime.tasks.scheduler import sandbox_limits

    spec = TaskSpec(argv=("x",), sandbox=SandboxSpec(cpus=1.0, memory_bytes=1 << 29,
                                                     timeout_s=3.0),
                    resources={"cpu": 2, "memory": 3 << 30})
    assert sandbox_limits(spec) == SandboxSpec(cpus=2.0, memory_bytes=3 << 30, timeout_s=3.0,
                                               batch=True)
    plain = TaskSpec(argv=("x",), sandbox=SandboxSpec(cpus=1.0))
    # every task is batch work, even one whose spec says otherwise
    assert sandbox_limits(plain) == SandboxSpec(cpus=1.0, batch=True)
    assert sandbox_limits(TaskSpec(argv=("x",), sandbox=SandboxSpec(batch=False))).batch


# -- placement -------------------------------------------------------------------------------


def registry(*cfgs: NodeConfig) -> NodeRegistry:
    reg = NodeRegistry()
    for cfg in cfgs:
        reg.add(Node.from_config(cfg))
    return reg


def test_selector_must_be_subset_of_labels_and_resources_must_fit():
    reg = registry(
        NodeConfig("cpu1", {"pool": "cpu"}, {"cpu": 4}),
        NodeConfig("gpu1", {"pool": "deep", "accelerator": "h200"},
                   {"cpu": 8, "accelerator.h200": 2}, {"accelerator.h200": ("/dev/a0", "/dev/a1")}),
    )
    assert reg.place({"pool": "deep"}, {"cpu": 1}).name == "gpu1"
    assert reg.place({"pool": "cpu"}, {"cpu": 5}) is None
    assert reg.place({"pool": "deep", "accelerator": "b200"}, {}) is None
    node = reg.place({}, {"accelerator.h200": 1})
    assert node.name == "gpu1"
    assert reg.reserve(node, "t1", {"accelerator.h200": 1}) == ("/dev/a0",)
    assert reg.reserve(node, "t2", {"accelerator.h200": 1}) == ("/dev/a1",)
    assert reg.place({}, {"accelerator.h200": 1}) is None
    reg.release("gpu1", "t1", {"accelerator.h200": 1}, ("/dev/a0",))
    assert reg.place({}, {"accelerator.h200": 1}) is node
    assert node.free_devices["accelerator.h200"] == ["/dev/a0"]


def test_cordoned_node_gets_nothing():
    reg = registry(NodeConfig("n1", {"pool": "x"}, {"cpu": 1}))
    reg.nodes["n1"].cordoned = True
    assert reg.place({"pool": "x"}, {"cpu": 1}) is None
    reg.check_satisfiable(TaskSpec(argv=("x",), selector={"pool": "x"}))  # could run later


def test_unsatisfiable_tasks_are_refused_with_the_field():
    reg = registry(NodeConfig("n1", {"pool": "x"}, {"cpu": 2}))
    with pytest.raises(InvalidSpec, match=r"^spec\.resources\[gpu\]: no node offers 'gpu'"):
        reg.check_satisfiable(TaskSpec(argv=("x",), resources={"gpu": 1}))
    with pytest.raises(Unsatisfiable, match=r"^spec\.selector: no node has the labels"):
        reg.check_satisfiable(TaskSpec(argv=("x",), selector={"pool": "y"}))
    with pytest.raises(Unsatisfiable, match=r"^spec\.resources: no node with the labels"):
        reg.check_satisfiable(TaskSpec(argv=("x",), resources={"cpu": 3}))


def test_node_config_checks_device_counts():
    with pytest.raises(InvalidSpec, match=r"^nodes\[g\]\.devices\[gpu\]: lists 1 device"):
        NodeConfig("g", {}, {"gpu": 2}, {"gpu": ("/dev/a0",)})


# -- store -----------------------------------------------------------------------------------


def _task(i: int, tenant: str = "t") -> DeepTask:
    return DeepTask(id=f"task-{i}", seq=i, tenant=tenant, spec=TaskSpec(argv=("true",)),
                    submitted_at=1.0, updated_at=1.0)


def test_store_commits_before_the_future_resolves(tmp_path):
    path = str(tmp_path / "tasks.db")

    async def main():
        store = TaskStore(path)
        store.start(asyncio.get_running_loop())
        futs = [store.insert(_task(i)) for i in range(500)]
        await asyncio.gather(*futs)
        # Visible to another connection now: committed, not merely queued.
        other = sqlite3.connect(path)
        assert other.execute("SELECT count(*) FROM tasks").fetchone()[0] == 500
        other.close()
        t = _task(3)
        t.state = TaskState.PLACED
        t.node = "n1"
        t.devices = ("/dev/a0",)
        await store.update(t)
        assert store.commits < 500  # group commit: many writes per transaction
        store.close()

    asyncio.run(main())
    store = TaskStore(path)
    tasks, _ = store.load()
    store.close()
    assert len(tasks) == 500
    assert [t.seq for t in tasks] == list(range(500))
    assert (tasks[3].state, tasks[3].node, tasks[3].devices) == (S.PLACED, "n1", ("/dev/a0",))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
