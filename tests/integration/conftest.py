"""Fixtures of the integration tests: one shared real daemon, clients, agent sandboxes.

The shared daemon runs for the whole test session. At its end it is stopped with SIGTERM and
must exit 0 leaving nothing of any sandbox it created (see DaemonProcess.leftovers). Tests
that kill, restart or tamper with a daemon start their own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from corral.runtime.client import ClientError

from .daemon_harness import DaemonProcess, upload_agents


def pytest_collection_modifyitems(config, items):
    """The daemon makes real sandboxes: without root, skip rather than fail."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="tests/integration need root (the daemon makes sandboxes)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("daemon")).start()
    yield d
    rc = d.stop()
    assert rc == 0, f"the daemon exited with {rc} on SIGTERM:\n{d.log()}"
    assert d.leftovers() == {}
    assert not os.path.exists(d.socket)
    result = d.verify()
    assert result.ok, result.problem
    # daemon.stop is the last action; only the checkpoint that signs it follows
    assert [r.kind for r in d.records()[-2:]] == ["daemon.stop", "audit.checkpoint"]


@pytest.fixture
def make_daemon(tmp_path):
    """DaemonProcess(tmp_path / name, ...) for a test's own daemon; none outlives the test."""
    made: list[DaemonProcess] = []

    def make(name: str = "d", **kw) -> DaemonProcess:
        d = DaemonProcess(tmp_path / name, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.ensure_stopped()


@pytest.fixture(scope="session")
def client(daemon):
    return daemon.client()


@pytest.fixture
def sandbox(client):
    """A fresh sandbox of tenant "local" holding the test agents; destroyed afterwards."""
    sb = client.create_sandbox(memory_bytes=256 << 20)
    upload_agents(client, sb.id)
    yield sb
    with contextlib.suppress(ClientError):
        client.destroy_sandbox(sb.id)
