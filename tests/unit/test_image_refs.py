"""How image references are read and recorded, where the store lives, and which registry
credentials docker's config gives (no root, no registry)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket

import pytest

from corral.sandbox.errors import InvalidSpec
from corral.sandbox.images import UnsupportedImage, default_root
from corral.sandbox.images.registry import (
    RegistryAuthError,
    RegistryError,
    RegistryRef,
    load_credential,
    parse_registry_ref,
    plain_http_allowed,
)
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


@pytest.mark.parametrize("ref", ["registry://r/x", "https://r/x"])
def test_url_forms_other_than_docker_are_refused(ref, tmp_path):
    scheme = ref.split(":")[0]
    with pytest.raises(UnsupportedImage, match=rf"^image '{ref}': the {scheme}:// form is not "
                                               r"read; name a registry image "
                                               r"docker://HOST/REPO\[:TAG\] or "
                                               r"HOST/REPO\[:TAG\]$"):
        open_source(ref, scratch=str(tmp_path))


@pytest.mark.parametrize(("name", "expected"), [
    ("localhost:5000/py:1", RegistryRef("localhost:5000", "py", "1", None)),
    ("127.0.0.1:5000/team/py", RegistryRef("127.0.0.1:5000", "team/py", "latest", None)),
    ("registry.example/a/b:v2", RegistryRef("registry.example", "a/b", "v2", None)),
    ("localhost/py", RegistryRef("localhost", "py", "latest", None)),
    ("[::1]:5000/py:1", RegistryRef("[::1]:5000", "py", "1", None)),
    ("python:3.12", RegistryRef("docker.io", "library/python", "3.12", None)),
    ("team/app", RegistryRef("docker.io", "team/app", "latest", None)),
    ("h.x/py@sha256:" + "a" * 64, RegistryRef("h.x", "py", None, "sha256:" + "a" * 64)),
    ("h.x/py:1@sha256:" + "b" * 64, RegistryRef("h.x", "py", "1", "sha256:" + "b" * 64)),
])
def test_registry_refs_read_as_docker_reads_them(name, expected):
    assert parse_registry_ref(name) == expected


@pytest.mark.parametrize(("name", "message"), [
    ("h.x/Py:1", r"repository 'Py' is not a valid name"),
    ("h.x/py:-bad", r"tag '-bad' is not a valid tag"),
    ("h.x/py@sha256:abc", r"digest 'sha256:abc' is not sha256:<64 hex>"),
    ("h.x/a//b", r"repository 'a//b' is not a valid name"),
])
def test_malformed_registry_refs_name_the_part(name, message):
    with pytest.raises(InvalidSpec, match=rf"^image: '{re.escape(name)}': {message}"):
        parse_registry_ref(name)


def test_docker_refs_are_recorded_normalized_and_bare_names_as_given():
    assert canonical_ref("docker://127.0.0.1:5000/py:1") == "127.0.0.1:5000/py:1"
    assert canonical_ref("docker://python:3.12") == "docker.io/library/python:3.12"
    assert canonical_ref("docker://h.x/py") == "h.x/py:latest"
    assert canonical_ref("127.0.0.1:5000/py") == "127.0.0.1:5000/py"  # as given, as before


def test_plain_http_only_for_loopback_and_named_insecure_hosts(monkeypatch):
    monkeypatch.delenv("CORRAL_INSECURE_REGISTRIES", raising=False)
    assert [plain_http_allowed(h) for h in ("localhost:5000", "127.0.0.1:5000", "127.9.9.9",
                                            "[::1]:5000", "10.0.0.1:5000", "reg.lan")] == [
        True, True, True, True, False, False]
    monkeypatch.setenv("CORRAL_INSECURE_REGISTRIES", "reg.lan, 10.0.0.1:5000")
    assert plain_http_allowed("reg.lan") and plain_http_allowed("reg.lan:443")
    assert plain_http_allowed("10.0.0.1:5000") and not plain_http_allowed("reg.other")


def _docker_config(tmp_path, monkeypatch, doc: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(doc))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    return str(tmp_path / "config.json")


def test_credentials_from_auths_in_each_form(tmp_path, monkeypatch):
    path = _docker_config(tmp_path, monkeypatch, {"auths": {
        "https://a.example/v1/": {"auth": base64.b64encode(b"ann:pw:with:colons").decode()},
        "b.example": {"username": "bob", "password": "s3cret"},
        "c.example:5000": {"identitytoken": "refresh-me"},
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()}}})
    cred, _ = load_credential("a.example")
    assert (cred.username, cred.secret, cred.identity_token) == ("ann", "pw:with:colons", False)
    assert cred.source == f"auths['https://a.example/v1/'] of {path}"
    assert "pw:with" not in repr(cred)  # the secret never shows in a repr or a log line
    assert load_credential("b.example")[0].secret == "s3cret"
    cred, _ = load_credential("c.example:5000")
    assert (cred.secret, cred.identity_token) == ("refresh-me", True)
    assert load_credential("docker.io")[0].username == "hub"
    assert load_credential("d.example") == (None, f"no credentials for d.example in {path}")


def test_no_config_and_a_bad_auth_field(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    assert load_credential("a.example") == (
        None, f"no credentials ({tmp_path}/none/config.json does not exist)")
    path = _docker_config(tmp_path, monkeypatch, {"auths": {"a.example": {"auth": "bm9jb2xvbg=="}}})
    with pytest.raises(InvalidSpec, match=rf"^docker config: auths\['a.example'\] of {path}: "
                                          r"'auth' is not base64 of user:password$"):
        load_credential("a.example")


def test_credential_helpers_are_run_with_the_server_on_stdin(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-corraltest"
    # a real helper program: answers for one server, "not found" for the rest
    helper.write_text("#!/bin/sh\nread server\n"
                      "if [ \"$server\" = h.example ]; then\n"
                      "  echo '{\"Username\":\"hu\",\"Secret\":\"hs\"}'\n"
                      "elif [ \"$server\" = t.example ]; then\n"
                      "  echo '{\"Username\":\"<token>\",\"Secret\":\"tk\"}'\n"
                      "else echo 'credentials not found in native keychain'; exit 1; fi\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = _docker_config(tmp_path, monkeypatch, {"credsStore": "corraltest",
                                                  "credHelpers": {"t.example": "corraltest"}})
    cred, source = load_credential("h.example")
    assert (cred.username, cred.secret, cred.identity_token) == ("hu", "hs", False)
    assert source == f"docker-credential-corraltest (from the credsStore of {path})"
    cred, _ = load_credential("t.example")
    assert (cred.username, cred.secret, cred.identity_token) == ("", "tk", True)
    assert load_credential("x.example") == (
        None, "no credentials for x.example in docker-credential-corraltest (from the "
              f"credsStore of {path})")
    _docker_config(tmp_path, monkeypatch, {"credsStore": "absent-helper"})
    with pytest.raises(RegistryAuthError, match=r"^registry x.example: the docker config names "
                                                r"the credential helper "
                                                r"docker-credential-absent-helper, which is "
                                                r"not on PATH$"):
        load_credential("x.example")


def test_default_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", "/srv/images")
    assert default_root() == "/srv/images"
    monkeypatch.delenv("CORRAL_IMAGE_ROOT")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_root() == "/var/lib/corral/images"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert default_root() == "/home/u/.state/corral/images"


def test_a_bare_name_no_engine_holds_says_how_to_name_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(UnsupportedImage) as caught:
        open_source("python:3.12", scratch=str(tmp_path))
    assert str(caught.value) == (
        f"image 'python:3.12': no Docker engine at unix://{tmp_path}/no-engine.sock (set "
        f"DOCKER_HOST), and pulling from a registry is not supported for a name without a "
        f"registry host: docker would pull it from its default registry (docker.io); name it "
        f"docker.io/library/python:3.12 (or docker://python:3.12) to pull from there")


def test_a_name_with_a_host_goes_to_that_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(RegistryError, match=rf"^registry 127.0.0.1:{port}: connection "
                                                r"refused \(http\)$"):
            open_source(f"127.0.0.1:{port}/team/app:1", scratch=str(tmp_path))
