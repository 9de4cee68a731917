"""Deep-task node declarations: `[[nodes]]` tables of the daemon's TOML, and the default.

    [[nodes]]
    name = "gpu-1"
    executor = "local"                       # or "ray"
    labels = { pool = "deep", accelerator = "h200" }
    resources = { cpu = 8, memory = "64G", "accelerator.h200" = 2 }
    devices = { "accelerator.h200" = ["/dev/nvidia0", "/dev/nvidia1"] }

`memory` may be a size ("64G") and is counted in bytes; every other resource is a number.
"""

from __future__ import annotations

import os
import socket

from corral.sandbox.errors import InvalidSpec
from corral.sandbox.spec import parse_size

from .nodes import NodeConfig

_KEYS = {"name", "labels", "resources", "devices", "executor"}


def nodes_from_toml(value, path: str) -> tuple[NodeConfig, ...]:
    if not isinstance(value, list):
        raise InvalidSpec("config", f"{path}: nodes must be an array of tables ([[nodes]])")
    out = []
    names = set()
    for i, table in enumerate(value):
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise InvalidSpec("config", f"{path}: [[nodes]] #{i + 1} needs name = \"...\"")
        unknown = set(table) - _KEYS
        if unknown:
            raise InvalidSpec("config", f"{path}: [[nodes]] {table['name']}: unknown "
                                        f"setting {sorted(unknown)[0]!r}")
        if table["name"] in names:
            raise InvalidSpec("config", f"{path}: node {table['name']!r} is declared twice")
        names.add(table["name"])
        resources = {}
        for res, amount in dict(table.get("resources", {})).items():
            if res == "memory" and isinstance(amount, str):
                amount = parse_size(amount, f"nodes[{table['name']}].resources.memory")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)):
                raise InvalidSpec(f"nodes[{table['name']}].resources[{res}]",
                                  f"{amount!r} is not a number")
            resources[res] = float(amount)
        out.append(NodeConfig(
            name=table["name"],
            labels={str(k): str(v) for k, v in dict(table.get("labels", {})).items()},
            resources=resources,
            devices={k: tuple(v) for k, v in dict(table.get("devices", {})).items()},
            executor=table.get("executor", "local")))
    return tuple(out)


def default_nodes() -> tuple[NodeConfig, ...]:
    """One local node: this machine's cores and memory, labelled with its host name."""
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 1 << 20
    host = socket.gethostname().split(".")[0].lower() or "local"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in host)[:63].strip("-.")
    safe = safe or "local"
    return (NodeConfig(name="local", labels={"corral/host": safe},
                       resources={"cpu": float(os.cpu_count() or 1),
                                  "memory": float(mem_kib * 1024)}),)
