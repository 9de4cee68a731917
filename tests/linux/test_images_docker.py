"""A name a local Docker engine holds is imported through `docker save` (a private dockerd
of the test session; the image comes from `docker import` of a tree built here)."""

from __future__ import annotations

import os
import subprocess

import pytest

from corral.sandbox.images import ImageNotFound, ImageStore

from ..unit.test_image_builder import Layer

NAME = "corral-images-test/rootfs:1"


def test_pull_a_name_the_local_engine_holds(docker_host, tmp_path):
    tree = Layer().dir("etc").file("etc/os-release", b"ID=corral-test\n").file("hello", b"hi")
    subprocess.run(["docker", "import", "-", NAME], input=tree.tar(), check=True,
                   capture_output=True, env={**os.environ, "DOCKER_HOST": docker_host})
    try:
        store = ImageStore(str(tmp_path / "store"))
        record = store.pull(NAME)
        assert record.ref == NAME and len(record.layers) == 1
        (layer,) = store.rootfs(NAME).layers
        with open(os.path.join(layer, "etc", "os-release"), "rb") as f:
            assert f.read() == b"ID=corral-test\n"
        assert os.listdir(os.path.join(store.root, "tmp")) == []  # the saved tar is gone
        with pytest.raises(ImageNotFound, match=r"^image 'corral-images-test/absent:1' is not "
                                                r"in the Docker engine at unix://.*, and "
                                                r"pulling from a registry is not supported"):
            store.pull("corral-images-test/absent:1")
        assert os.listdir(os.path.join(store.root, "tmp")) == []
    finally:
        subprocess.run(["docker", "rmi", NAME], capture_output=True,
                       env={**os.environ, "DOCKER_HOST": docker_host})
