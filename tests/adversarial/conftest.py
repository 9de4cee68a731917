"""Fixtures of the adversarial suite: a daemon shared by a hostile and a well-behaved tenant."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """The daemon makes real sandboxes: without root, skip rather than fail."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="tests/adversarial need root (the daemon makes sandboxes)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)
