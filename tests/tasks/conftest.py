"""Fixtures of the deep-task tests: daemons with declared nodes, and cleanup of shims.

Deep-task attempts run under shims that outlive their daemon on purpose; each test's daemon
keeps its state under the test's tmp_path, so whatever shim a test leaves is found by that
path in /proc and ended here (the test process is made the subreaper that reaps them).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from corral.sandbox import sweep

from ..integration.daemon_harness import DaemonProcess, reap, set_child_subreaper
from .helpers import attempt_files, shims_under, wait_until_true


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="tests/tasks need root (the daemon makes sandboxes)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def task_daemon(tmp_path):
    """task_daemon(config_toml, name="d") -> a started DaemonProcess; all cleaned up after."""
    made: list[DaemonProcess] = []
    set_child_subreaper(True)

    def make(config: str = "", name: str = "d", start: bool = True) -> DaemonProcess:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        d = DaemonProcess(tmp_path / name, config=config or None)
        made.append(d)
        return d.start() if start else d

    try:
        yield make
    finally:
        for d in made:
            d.ensure_stopped()
        # A shim forked just before its daemon stopped records itself in a moment.
        wait_until_true(lambda: all(os.path.exists(os.path.join(os.path.dirname(p),
                                                                "shim.json"))
                                    for p in attempt_files(str(tmp_path), "plan.json")), 5.0)
        pids = shims_under(str(tmp_path))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap(pids)
        set_child_subreaper(False)
        if pids:  # their sandboxes died with them; remove what those left (run dir, cgroup)
            with contextlib.suppress(FileNotFoundError):
                sweep()
