"""Placement by executor ability: a task that only a local node can honour (secrets, a
snapshot, a copy-on-write workspace) is never placed on a Ray node that its selector
matches; other tasks take the first node that fits, whatever its executor."""

from __future__ import annotations

from corral.runtime.tasks.nodes import Node, NodeConfig, NodeRegistry, node_local_fields
from corral.sandbox.spec import SandboxSpec


def _registry() -> NodeRegistry:
    reg = NodeRegistry()
    # the Ray node comes first in first-fit order (an empty selector's)
    reg.add(Node.from_config(NodeConfig("ray-1", {"pool": "a"}, {"cpu": 4.0}, executor="ray")))
    reg.add(Node.from_config(NodeConfig("local-1", {"pool": "a"}, {"cpu": 4.0})))
    return reg


def test_local_only_task_skips_a_ray_node():
    reg = _registry()
    assert reg.place({}, {"cpu": 1.0}).name == "ray-1"
    assert reg.place({}, {"cpu": 1.0}, local_only=True).name == "local-1"
    assert reg.place({"pool": "a"}, {"cpu": 1.0}, local_only=True).name == "local-1"


def test_local_only_task_waits_when_only_ray_nodes_are_free():
    reg = _registry()
    local = reg.get("local-1")
    reg.reserve(local, "task-x", {"cpu": 4.0})
    assert reg.place({"pool": "a"}, {"cpu": 1.0}, local_only=True) is None
    assert reg.place({"pool": "a"}, {"cpu": 1.0}).name == "ray-1"


def test_node_local_fields_names_each_field():
    assert node_local_fields(SandboxSpec()) == []
    assert node_local_fields(SandboxSpec(snapshot="snap-0123456789ab")) == ["spec.sandbox.snapshot"]
