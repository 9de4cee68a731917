"""A daemon sandbox whose root filesystem is an image of the daemon's store (spec.image)."""

from __future__ import annotations

import pytest

from corral.runtime.client import ClientError
from corral.sandbox.images.store import ImageStore

from ..linux.test_image_run import app_layer, tools_layer, top_layer
from ..unit.test_image_builder import write_oci
from .daemon_harness import collect_exec, sandbox_footprint, wait_until


def test_a_daemon_sandbox_runs_on_an_image_and_releases_it(tmp_path, monkeypatch,
                                                             make_daemon):
    store_root = str(tmp_path / "store")
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", store_root)  # the daemon inherits it
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), app_layer(), top_layer()])
    record = ImageStore(store_root).pull(ref)
    daemon = make_daemon().start()
    client = daemon.client()
    sb = client.create_sandbox(image=ref, ttl_s=600)
    assert sb.spec.image == ref
    res = collect_exec(client.exec(sb.id, ["/bin/sh", "-c", "cat /image-only-file; "
                                           "stat -c %u:%g /home/app/owned"]))
    assert (res.returncode, res.stdout, res.stderr) == (
        0, b"from the image\n1000:1001\n", b"")
    assert len(ImageStore(store_root).remove(record.id).in_use) == 3  # held while it runs
    client.destroy_sandbox(sb.id)
    assert wait_until(lambda: sandbox_footprint(sb.id) == {})
    assert len(ImageStore(store_root).prune().layers) == 3

    with pytest.raises(ClientError) as exc:
        client.create_sandbox(image="oci:/nonexistent:latest")
    assert exc.value.code.name == "NOT_FOUND"
