"""Leak check of the docker backend's tests: no container and no temporary workspace a
test made may remain when it ends."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def no_docker_leftovers(request, monkeypatch):
    if "docker_host" not in request.fixturenames:
        yield
        return
    engine = request.getfixturevalue("docker_engine")
    from corral.sandbox.backends import docker

    made: list[str] = []
    setup = docker.DockerSandbox._setup_workspace

    def recording_setup(self):
        setup(self)
        if self._own_workspace:
            made.append(self.workspace)

    monkeypatch.setattr(docker.DockerSandbox, "_setup_workspace", recording_setup)
    yield
    api = docker.client(engine.url)
    containers = api.containers(all=True, filters={"label": docker.LABEL})
    left = [c["Names"][0] for c in containers]
    for c in containers:
        api.remove_container(c["Id"], force=True)
    workspaces = [w for w in made if os.path.exists(w)]
    if left or workspaces:
        pytest.fail(f"{request.node.nodeid} left behind containers {left} "
                    f"and workspaces {workspaces}", pytrace=False)
