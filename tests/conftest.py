"""Fixtures shared across suites: a private Docker engine for the docker backend's tests.

The engine is started once per test session, only when a test asks for it, on a private
socket and data root (no bridge, no iptables: the host's network is left alone), and is
stopped with its data removed at the end of the session.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def docker_engine():
    """A running private dockerd; yields its PrivateEngine (``.url`` is its socket URL)."""
    if os.geteuid() != 0:
        pytest.skip("the docker backend's tests start their own dockerd, which needs root")
    from corral.sandbox.backends.docker.private_engine import PrivateEngine

    engine = PrivateEngine().start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def docker_host(docker_engine, monkeypatch):
    """The private engine's URL, also exported as DOCKER_HOST for code that reads it."""
    monkeypatch.setenv("DOCKER_HOST", docker_engine.url)
    return docker_engine.url
