"""README's API table names every service and RPC of proto/corral/v1, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from corral.v1 import (
    audit_pb2,
    image_pb2,
    sandbox_pb2,
    session_pb2,
    snapshot_pb2,
    stream_pb2,
    task_pb2,
)

README = Path(__file__).resolve().parents[2] / "README.md"
_ROW = re.compile(r"^\| `(\w+)` \((\w+\.proto)\) \| (.+) \|$")


def _readme_services() -> dict[str, tuple[str, set[str]]]:
    """service -> (proto file, RPC names) from the README's table."""
    rows = (_ROW.match(line) for line in README.read_text().splitlines())
    return {m[1]: (m[2], set(re.findall(r"`(\w+)`", m[3]))) for m in rows if m}


def _proto_services() -> dict[str, tuple[str, set[str]]]:
    services = {}
    for module in (audit_pb2, image_pb2, sandbox_pb2, session_pb2, snapshot_pb2, stream_pb2,
                   task_pb2):
        file = module.DESCRIPTOR.name.rsplit("/", 1)[-1]
        for service in module.DESCRIPTOR.services_by_name.values():
            services[service.name] = (file, {m.name for m in service.methods})
    return services


def test_the_readme_lists_every_service_and_rpc():
    assert _readme_services() == _proto_services()
