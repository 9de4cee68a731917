"""How image references are read and recorded, and where the store lives (no root)."""

from __future__ import annotations

import os

import pytest

from corral.sandbox.images import UnsupportedImage, default_root
from corral.sandbox.images.sources import canonical_ref, open_source


def test_oci_ref_splits_an_optional_tag_and_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_ref("oci:img:v1") == f"oci:{tmp_path}/img:v1"
    assert canonical_ref("oci:img") == f"oci:{tmp_path}/img"
    assert canonical_ref("oci:/a/b:c/d") == "oci:/a/b:c/d"  # a ':' before a '/' is the path's
    os.mkdir(tmp_path / "dir:with-colon")
    assert canonical_ref("oci:dir:with-colon") == f"oci:{tmp_path}/dir:with-colon"


def test_archive_and_engine_refs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_ref("docker-archive:x.tar") == f"docker-archive:{tmp_path}/x.tar"
    assert canonical_ref("docker-daemon:python:3.12") == "python:3.12"
    assert canonical_ref("python:3.12") == "python:3.12"


@pytest.mark.parametrize("ref", ["docker://python:3.12", "registry://r/x", "https://r/x"])
def test_registry_transports_are_refused(ref, tmp_path):
    with pytest.raises(UnsupportedImage, match=rf"^image '{ref}': pulling from a registry is "
                                               r"not supported yet \(issue #12\)"):
        open_source(ref, scratch=str(tmp_path))


def test_default_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", "/srv/images")
    assert default_root() == "/srv/images"
    monkeypatch.delenv("CORRAL_IMAGE_ROOT")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_root() == "/var/lib/corral/images"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert default_root() == "/home/u/.state/corral/images"
