"""Pulls from a real registry (Debian's docker-registry on 127.0.0.1, storage in a temp
directory): by tag and digest, OCI and Docker indexes, Basic auth through htpasswd, the
Bearer token flow through a token front, a blob whose bytes are not its digest, concurrent
pulls, the CLI (plain lines, a progress bar on a terminal, push) and `corral run --image`
of a registry image running the image's own Python."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import pty
import re
import subprocess
import sys
import threading

import pytest

from corral.runtime.cli import main
from corral.sandbox.images import ImageNotFound, ImageStore, LayerDigestMismatch
from corral.sandbox.images.registry import RegistryAuthError, RegistryError
from corral.sandbox.images.sources import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    push_image,
)

from ..unit.test_image_builder import Layer, config_for, digest, write_oci
from .registry_server import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    OCI_CONFIG,
    OCI_LAYER,
    TokenFront,
    blob_file,
    docker_registry,
    free_port,
    push_manifest_with_blobs,
)
from .test_image_run import python_layer, tools_layer

USER, PASSWORD = "corral", "right horse battery"


@pytest.fixture
def registry(tmp_path):
    with docker_registry(str(tmp_path / "registry")) as host:
        yield host


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    return ImageStore(str(tmp_path / "store"))


def _layers() -> list[Layer]:
    return [Layer().dir("etc").file("etc/os-release", b"ID=registry-test\n"),
            Layer(compress=False).file("top", b"t" * 50000)]


def _push(tmp_path, dest: str, layers: list[Layer] | None = None) -> str:
    ref = write_oci(str(tmp_path / ("img-" + dest.replace("/", "_").replace(":", "_"))),
                    layers or _layers())
    return push_image(ref, dest, scratch=str(tmp_path))


def _read(store: ImageStore, ref: str, path: str) -> bytes:
    for layer in reversed(store.rootfs(ref).layers):
        if os.path.exists(os.path.join(layer, path)):
            with open(os.path.join(layer, path), "rb") as f:
                return f.read()
    raise FileNotFoundError(path)


def _assert_nothing_kept(store: ImageStore) -> None:
    assert store.images() == []
    assert os.listdir(os.path.join(store.root, "layers", "sha256")) == []
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_pull_by_tag_and_by_digest(registry, store, tmp_path):
    manifest_digest = _push(tmp_path, f"{registry}/small:1")
    events = []
    record = store.pull(f"{registry}/small:1", progress=events.append)
    assert (record.ref, record.manifest_digest) == (f"{registry}/small:1", manifest_digest)
    assert [e.state for e in events] == ["unpacked", "unpacked"]
    assert _read(store, record.ref, "etc/os-release") == b"ID=registry-test\n"
    events.clear()
    pinned = store.pull(f"docker://{registry}/small@{manifest_digest}", progress=events.append)
    assert pinned.ref == f"{registry}/small@{manifest_digest}"
    assert (pinned.id, [e.state for e in events]) == (record.id, ["present", "present"])
    with pytest.raises(ImageNotFound, match=rf"^registry {registry}, repository small: no "
                                            r"manifest 2 \(404: MANIFEST_UNKNOWN\)$"):
        store.pull(f"{registry}/small:2")
    with pytest.raises(ImageNotFound, match=rf"^registry {registry}, repository absent: no "
                                            r"manifest 1 \(404: MANIFEST_UNKNOWN\)$"):
        store.pull(f"{registry}/absent:1")


def _platform_image(arch: str, config_type: str, layer_type: str):
    """(blobs, manifest) of a one-layer image for linux/ARCH."""
    layer = Layer().file("arch", arch.encode())
    config = json.dumps({**json.loads(config_for([layer])), "architecture": arch}).encode()
    manifest = {"schemaVersion": 2, "mediaType": None,
                "config": {"mediaType": config_type, "digest": digest(config),
                           "size": len(config)},
                "layers": [{"mediaType": layer_type, "digest": digest(layer.blob()),
                            "size": len(layer.blob())}]}
    return [layer.blob(), config], manifest


@pytest.mark.parametrize(("index_type", "manifest_type", "config_type", "layer_type"), [
    (OCI_INDEX, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    (DOCKER_LIST, DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
])
def test_an_index_of_two_platforms_gives_the_hosts(registry, store, index_type, manifest_type,
                                                   config_type, layer_type):
    entries = []
    for arch in ("arm64", "amd64"):
        blobs, manifest = _platform_image(arch, config_type, layer_type)
        manifest["mediaType"] = manifest_type
        data = json.dumps(manifest).encode()
        entries.append({"mediaType": manifest_type, "digest": digest(data), "size": len(data),
                        "platform": {"os": "linux", "architecture": arch}})
        push_manifest_with_blobs(f"{registry}/multi", blobs, manifest, manifest_type)
    index = {"schemaVersion": 2, "mediaType": index_type, "manifests": entries}
    index_digest = push_manifest_with_blobs(f"{registry}/multi", [], index, index_type,
                                            tag="1")
    record = store.pull(f"{registry}/multi:1")
    assert record.manifest_digest == entries[1]["digest"]  # amd64's, this host's
    assert _read(store, record.ref, "arch") == b"amd64"
    pinned = store.pull(f"{registry}/multi@{index_digest}")  # the index's digest, verified
    assert pinned.id == record.id


def _docker_config(tmp_path, monkeypatch) -> str:
    """A DOCKER_CONFIG of the test's own; returns where its config.json goes."""
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    return str(config_dir / "config.json")


def _auths(path: str, host: str, entry: dict) -> None:
    with open(path, "w") as f:
        json.dump({"auths": {host: entry}}, f)


def test_basic_auth_through_htpasswd(tmp_path, store, monkeypatch):
    with docker_registry(str(tmp_path / "reg"), users={USER: PASSWORD}) as host:
        path = _docker_config(tmp_path, monkeypatch)
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        _auths(path, host, {"auth": auth})
        _push(tmp_path, f"{host}/private:1")
        assert store.pull(f"{host}/private:1").ref == f"{host}/private:1"
        # a wrong password: refused, naming the registry and the source, never the secret
        _auths(path, host, {"username": USER, "password": "wrong horse"})
        other = ImageStore(str(tmp_path / "store2"))
        with pytest.raises(RegistryAuthError) as caught:
            other.pull(f"{host}/private:1")
        assert str(caught.value) == (
            f"registry {host}, repository private: the registry refused the credentials "
            f"(401); tried auths['{host}'] of {path}")
        _assert_nothing_kept(other)
        os.unlink(path)  # no credentials at all
        with pytest.raises(RegistryAuthError, match=rf"^registry {host}, repository private: "
                                                    r"the registry needs a username and "
                                                    rf"password \(401, Basic\); no "
                                                    rf"credentials \({path} does not "
                                                    r"exist\)$"):
            other.pull(f"{host}/private:1")
        _assert_nothing_kept(other)


def test_bearer_token_flow_and_a_redirected_blob(registry, tmp_path, store, monkeypatch):
    _push(tmp_path, f"{registry}/tokened:1")
    with TokenFront(registry, USER, PASSWORD) as front:
        path = _docker_config(tmp_path, monkeypatch)
        _auths(path, front.host, {"username": USER, "password": PASSWORD})
        record = store.pull(f"{front.host}/tokened:1")
        assert _read(store, record.ref, "top") == b"t" * 50000
        # one token, asked for with the challenge's service and scope, used from then on
        assert front.token_requests == [{"service": "corral-test",
                                         "scope": "repository:tokened:pull"}]
        # the blobs came from the redirect's other host, without the token
        assert front.direct_auth == [None, None, None]  # config + 2 layers
        _auths(path, front.host, {"username": USER, "password": "wrong"})
        other = ImageStore(str(tmp_path / "store2"))
        with pytest.raises(RegistryAuthError, match=rf"^registry {front.host}, repository "
                                                    rf"tokened: the token service "
                                                    rf"{front.host} refused \(401\); tried "
                                                    rf"auths\['{front.host}'\] of {path}$"):
            other.pull(f"{front.host}/tokened:1")
        _assert_nothing_kept(other)


def test_an_identity_token_is_traded_for_a_token(registry, tmp_path, store, monkeypatch):
    _push(tmp_path, f"{registry}/tokened:1")
    with TokenFront(registry, USER, PASSWORD, refresh_token="refresh-abc") as front:
        path = _docker_config(tmp_path, monkeypatch)
        _auths(path, front.host, {"identitytoken": "refresh-abc"})
        assert store.pull(f"{front.host}/tokened:1").ref == f"{front.host}/tokened:1"
        assert front.token_requests == [{
            "service": "corral-test", "scope": "repository:tokened:pull",
            "grant_type": "refresh_token", "refresh_token": "refresh-abc",
            "client_id": "corral"}]


def test_an_https_token_realm_is_verified_against_the_cas(registry, tmp_path, store,
                                                          monkeypatch):
    _push(tmp_path, f"{registry}/tokened:1")
    with TokenFront(registry, USER, PASSWORD, tls_dir=str(tmp_path / "tls")) as front:
        _auths(_docker_config(tmp_path, monkeypatch), front.host,
               {"username": USER, "password": PASSWORD})
        realm_host = front.realm.split("/")[2]
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system's CAs: not this one
        with pytest.raises(RegistryError, match=rf"^registry {realm_host}: TLS failed "
                                                r"\(CERTIFICATE_VERIFY_FAILED\); its "
                                                r"certificate must verify against the "
                                                r"system's CAs"):
            store.pull(f"{front.host}/tokened:1")
        assert front.token_requests == []
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "tls" / "cert.pem"))
        assert store.pull(f"{front.host}/tokened:1").ref == f"{front.host}/tokened:1"
        assert len(front.token_requests) == 1


def test_a_blob_that_is_not_its_digest_is_refused(tmp_path, store):
    layers = _layers()
    with docker_registry(str(tmp_path / "reg")) as host:
        _push(tmp_path, f"{host}/bad:1", layers)
        # the registry serves what its storage holds: change a byte of a file's data in the
        # uncompressed layer there (still a valid tar, of other bytes)
        blob = blob_file(str(tmp_path / "reg"), digest(layers[1].blob()))
        with open(blob, "r+b") as f:
            f.seek(4096)
            f.write(b"X")
        with pytest.raises(LayerDigestMismatch, match=r"^127\.0\.0\.1:\d+/bad:1: layer "
                                                      r"sha256:\w+ unpacks to sha256:\w+, not "
                                                      r"the config's diff_id sha256:\w+; "
                                                      r"nothing was kept$"):
            store.pull(f"{host}/bad:1")
        # no record and nothing of the bad layer; the good layer below it stays (for prune)
        assert store.images() == []
        assert os.listdir(os.path.join(store.root, "layers", "sha256")) == [
            digest(layers[0].tar())[7:]]
        assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_a_pinned_digest_is_verified_against_the_manifest_served(tmp_path, store):
    with docker_registry(str(tmp_path / "reg")) as host:
        manifest_digest = _push(tmp_path, f"{host}/pinned:1")
        # the registry's stored manifest now says something else (still JSON, same size)
        path = blob_file(str(tmp_path / "reg"), manifest_digest)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(re.sub(rb'("size": \d*)(\d)',
                           lambda m: m[1] + str((int(m[2]) + 1) % 10).encode(), data, count=1))
        with pytest.raises(LayerDigestMismatch, match=rf"^{host}/pinned@{manifest_digest}: "
                                                      rf"manifest {manifest_digest} has "
                                                      r"digest sha256:\w+, not "
                                                      rf"{manifest_digest}; nothing was kept$"):
            store.pull(f"{host}/pinned@{manifest_digest}")
        _assert_nothing_kept(store)


def test_two_concurrent_pulls_unpack_each_layer_once(registry, store, tmp_path):
    _push(tmp_path, f"{registry}/shared:1")
    barrier = threading.Barrier(2)

    def pull() -> list[str]:
        states: list[str] = []
        barrier.wait()  # both start together
        store.pull(f"{registry}/shared:1", progress=lambda e: states.append(e.state))
        return states

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(pull) for _ in range(2)]
        states = [state for f in futures for state in f.result()]
    assert sorted(states) == ["present", "present", "unpacked", "unpacked"]
    assert len(os.listdir(os.path.join(store.root, "layers", "sha256"))) == 2


def test_connection_refused_names_host_and_port(store):
    port = free_port()
    with pytest.raises(RegistryError, match=rf"^registry 127.0.0.1:{port}: connection "
                                            r"refused \(http\)$"):
        store.pull(f"127.0.0.1:{port}/x:1")
    _assert_nothing_kept(store)


def test_cli_pull_prints_lines_and_push_sends_a_layout(registry, tmp_path, capfd,
                                                       monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    src = write_oci(str(tmp_path / "layout"), _layers())
    store = str(tmp_path / "store")
    assert main(["image", "push", "--store", store, src, f"{registry}/cli:1"]) == 0
    out, _ = capfd.readouterr()
    assert re.fullmatch(rf"{registry}/cli:1 sha256:[0-9a-f]{{64}}\n", out)
    assert main(["image", "pull", "--store", store, f"{registry}/cli:1"]) == 0
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert [re.sub(r"sha256:\w+", "ID", line) for line in lines] == [
        "layer 1/2 ID unpacked (10.2 kB)", "layer 2/2 ID unpacked (61.4 kB)"]


def test_cli_pull_on_a_terminal_shows_a_bar_per_layer(registry, tmp_path):
    _push(tmp_path, f"{registry}/bars:1")
    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm",
           "DOCKER_CONFIG": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, "-m", "corral.runtime.cli", "image", "pull",
                           "--store", str(tmp_path / "store"), f"{registry}/bars:1"],
                          stdout=subprocess.PIPE, stderr=secondary, env=env, timeout=120)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    assert proc.returncode == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode())
    assert "layer 1/2" in text and "layer 2/2" in text
    assert re.search(r"layer 2/2 [0-9a-f]{12} unpacked ━+ 61\.4/61\.4 kB", text)
    assert proc.stdout.decode().startswith(f"{registry}/bars:1 sha256:")


def test_corral_run_on_a_registry_image_runs_its_python(registry, tmp_path, monkeypatch,
                                                        capfd):
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    _push(tmp_path, f"{registry}/py:1", [tools_layer(), python_layer()])
    code = main(["run", "--image", f"{registry}/py:1", "--", "/opt/py/bin/python3", "-I", "-S",
                 "-c", "import sys; print(sys.prefix, sys.executable)"])
    out, err = capfd.readouterr()
    assert (code, out) == (0, "/opt/py /opt/py/bin/python3\n")
    assert not os.path.exists("/opt/py")  # the image's Python, not the host's
    assert [r.ref for r in ImageStore().images()] == [f"{registry}/py:1"]
