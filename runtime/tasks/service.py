"""Builds the daemon's scheduler from its config: nodes, executors, state directory."""

from __future__ import annotations

from .config import default_nodes
from .holds import SnapshotHolds
from .local import LocalExecutor
from .scheduler import Scheduler


async def start_scheduler(cfg, audit, policies=None) -> Scheduler:
    nodes = tuple(cfg.nodes) or default_nodes()
    local = LocalExecutor(cpu_weight=cfg.task_cpu_weight)
    local.secret_store = cfg.secret_store()  # its shims read the values (runner.py)
    executors: dict = {"local": local}
    if any(n.executor == "ray" for n in nodes):
        try:
            import ray  # noqa: F401
        except ImportError:
            names = ", ".join(n.name for n in nodes if n.executor == "ray")
            raise RuntimeError(f"nodes {names} use executor = \"ray\": install the corral[ray] "
                               "extra (pip install 'corral[ray]')") from None
        from .ray_executor import RayExecutor

        executors["ray"] = RayExecutor(address=cfg.ray_address,
                                       nodes=[n for n in nodes if n.executor == "ray"])
    scheduler = Scheduler(cfg.state, audit, list(nodes), executors=executors,
                          policies=policies, retention_s=cfg.task_retention_s,
                          cpu_weight=cfg.task_cpu_weight)
    await scheduler.start()
    #: Snapshots held for the unfinished tasks that start from them (holds.py).
    scheduler.snapshot_holds = SnapshotHolds()
    scheduler.snapshot_holds.start(scheduler)
    return scheduler
