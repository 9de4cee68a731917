"""Nodes and placement: labels, countable resources, device grants, cordon/drain.

A node is declared in the daemon's config (``[[nodes]]``) or, with Ray, reported by its
actor. ``NodeRegistry`` keeps an inverted index ``(label key, value) -> node names`` so a
selector narrows the candidates with set intersections (smallest set first) instead of
scanning every node; the candidates are then checked for free resources, first fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from corral.sandbox.errors import InvalidSpec, NotFound

from .model import TaskSpec, Unsatisfiable, check_label_key, check_label_value, check_resource

EPSILON = 1e-9


def node_local_fields(sandbox) -> list[str]:
    """The API fields of a task's sandbox that only a local node can honour.

    A Ray node's attempt runs in an actor on another machine, with a state directory of
    its own: it has no way to the daemon's secret store (values must stay out of Ray's
    object store and logs), nor to the daemon's snapshots or a task's copy-on-write change
    set. Such a task is refused at submit where its selector matches a Ray node
    (runtime/api/tasks.py), is placed on local nodes only (NodeRegistry.place), and fails,
    never runs without its state, should it reach a Ray node anyway (RayExecutor.launch).
    """
    fields = []
    if sandbox.secrets:
        fields.append("spec.sandbox.secrets")
    if sandbox.snapshot:
        fields.append("spec.sandbox.snapshot")
    if sandbox.workspace is not None:
        fields.append("spec.sandbox.workspace_dir")
    return fields


@dataclass
class NodeConfig:
    """One `[[nodes]]` table of the daemon's config."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    #: resource name -> device files it grants, one per unit (e.g. /dev/nvidia0).
    devices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: "local" (this machine, sandboxes under a shim) or "ray" (a Ray node's actor).
    executor: str = "local"

    def __post_init__(self):
        where = f"nodes[{self.name}]"
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise InvalidSpec("nodes.name", f"{self.name!r} is not a node name")
        for key, value in self.labels.items():
            check_label_key(key, f"{where}.labels")
            check_label_value(key, value, f"{where}.labels")
        for res, amount in self.resources.items():
            check_resource(res, amount, f"{where}.resources")
        for res, paths in self.devices.items():
            if res not in self.resources:
                raise InvalidSpec(f"{where}.devices", f"{res!r} is not one of the node's "
                                                      "resources")
            if len(paths) != int(self.resources[res]):
                raise InvalidSpec(f"{where}.devices[{res}]",
                                  f"lists {len(paths)} device files for {self.resources[res]:g} "
                                  "units; give one per unit")
            for p in paths:
                if not p.startswith("/dev/") and not p.startswith("/"):
                    raise InvalidSpec(f"{where}.devices[{res}]", f"{p!r} is not an absolute path")
        if self.executor not in ("local", "ray"):
            raise InvalidSpec(f"{where}.executor", f"{self.executor!r} is not local or ray")


@dataclass
class Node:
    """A node as the scheduler sees it (free resources change with every placement)."""

    name: str
    labels: dict[str, str]
    capacity: dict[str, float]
    free: dict[str, float]
    devices: dict[str, tuple[str, ...]]
    free_devices: dict[str, list[str]]
    executor: str = "local"
    cordoned: bool = False
    draining: bool = False
    lost: bool = False
    heartbeat_at: float = 0.0
    tasks: set[str] = field(default_factory=set)

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> Node:
        return cls(cfg.name, dict(cfg.labels), dict(cfg.resources), dict(cfg.resources),
                   {k: tuple(v) for k, v in cfg.devices.items()},
                   {k: list(v) for k, v in cfg.devices.items()}, cfg.executor,
                   heartbeat_at=time.time())

    @property
    def schedulable(self) -> bool:
        return not (self.cordoned or self.draining or self.lost)

    def fits(self, resources: dict[str, float]) -> bool:
        free = self.free
        for res, amount in resources.items():
            if free.get(res, 0.0) + EPSILON < amount:
                return False
        return True

    def could_ever_fit(self, resources: dict[str, float]) -> bool:
        cap = self.capacity
        return all(cap.get(r, 0.0) + EPSILON >= a for r, a in resources.items())


class NodeRegistry:
    """Every node, an index of their labels, and the placement decision."""

    def __init__(self):
        self.nodes: dict[str, Node] = {}
        self._index: dict[tuple[str, str], set[str]] = {}
        self._label_keys: set[str] = set()
        self._resource_names: set[str] = set()
        self._order: list[str] = []  # stable first-fit order for an empty selector

    @property
    def resource_names(self) -> frozenset[str]:
        """Every resource some node offers."""
        return frozenset(self._resource_names)

    def add(self, node: Node) -> Node:
        if node.name in self.nodes:
            self.remove(node.name)
        self.nodes[node.name] = node
        for kv in node.labels.items():
            self._index.setdefault(kv, set()).add(node.name)
            self._label_keys.add(kv[0])
        self._resource_names.update(node.capacity)
        self._order.append(node.name)
        return node

    def remove(self, name: str) -> None:
        node = self.nodes.pop(name)
        for kv in node.labels.items():
            self._index.get(kv, set()).discard(name)
        self._order.remove(name)

    def get(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise NotFound(f"node {name!r} does not exist")
        return node

    # -- admission -----------------------------------------------------------------------------

    def check_satisfiable(self, spec: TaskSpec) -> None:
        """Refuse a task that no node, free or busy, could ever run.

        Raises:
            InvalidSpec: a resource no node has (spec.resources[NAME]).
            Unsatisfiable: no node has the labels, or none with them has the capacity.
        """
        for res in spec.resources:
            if res not in self._resource_names:
                known = ", ".join(sorted(self._resource_names)) or "none"
                raise InvalidSpec(f"spec.resources[{res}]",
                                  f"no node offers {res!r} (known: {known})")
        matching = self._candidates(spec.selector)
        if not matching:
            raise Unsatisfiable("spec.selector", f"no node has the labels {spec.selector}")
        if not any(self.nodes[n].could_ever_fit(spec.resources) for n in matching):
            raise Unsatisfiable("spec.resources", f"no node with the labels {spec.selector} "
                                                  f"has {spec.resources} in all")

    # -- placement ---------------------------------------------------------------------------

    def _candidates(self, selector: dict[str, str]):
        if not selector:
            return self._order
        sets = []
        for kv in selector.items():
            s = self._index.get(kv)
            if not s:
                return ()
            sets.append(s)
        if len(sets) == 1:
            return sets[0]
        sets.sort(key=len)
        return set.intersection(*sets)

    def place(self, selector: dict[str, str], resources: dict[str, float],
              local_only: bool = False) -> Node | None:
        """The first schedulable node that matches the selector and has the resources free;
        with local_only (node_local_fields), a node of the local executor only."""
        nodes = self.nodes
        for name in self._candidates(selector):
            node = nodes[name]
            if local_only and node.executor != "local":
                continue
            if node.schedulable and node.fits(resources):
                return node
        return None

    def reserve(self, node: Node, task_id: str, resources: dict[str, float]) -> tuple[str, ...]:
        """Take the resources (and one device file per unit of a device resource)."""
        granted: list[str] = []
        for res, amount in resources.items():
            node.free[res] = node.free.get(res, 0.0) - amount
            pool = node.free_devices.get(res)
            if pool is not None:
                take = min(len(pool), math.ceil(amount - EPSILON))
                granted += pool[:take]
                del pool[:take]
        node.tasks.add(task_id)
        return tuple(granted)

    def reserve_exact(self, node: Node, task_id: str, resources: dict[str, float],
                      devices: tuple[str, ...]) -> None:
        """Re-take what a recovered task holds (after a restart), its devices included."""
        for res, amount in resources.items():
            node.free[res] = node.free.get(res, 0.0) - amount
        for pool in node.free_devices.values():
            for d in devices:
                if d in pool:
                    pool.remove(d)
        node.tasks.add(task_id)

    def release(self, node_name: str, task_id: str, resources: dict[str, float],
                devices: tuple[str, ...]) -> None:
        node = self.nodes.get(node_name)
        if node is None or task_id not in node.tasks:
            return
        node.tasks.discard(task_id)
        for res, amount in resources.items():
            node.free[res] = min(node.capacity.get(res, 0.0), node.free.get(res, 0.0) + amount)
        for res, paths in node.devices.items():
            pool = node.free_devices[res]
            for d in devices:
                if d in paths and d not in pool:
                    pool.append(d)
            pool.sort(key=paths.index)
