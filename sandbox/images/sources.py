"""Where images come from: an OCI layout, a `docker save` tarball, a local Docker engine,
a registry.

`open_source(ref)` returns an `ImageSource`: the canonical ref, the manifest bytes and
digest, the config bytes and digest, and one `LayerSource` per layer (bottom first) that
opens the layer blob as it is stored (compressed or not). Nothing here trusts a digest:
the store hashes everything on the way in. `push_image` sends an image of any source to a
registry (registry.py speaks the distribution API).

Which REF is which: `oci:`, `docker-archive:`, `docker-daemon:` and `docker://` name their
transport; a bare NAME whose first component is a host (`localhost:5000/x`,
`registry.example/x`) is a registry image unless a local engine holds it; any other bare
NAME is an image of the local engine, as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from ..errors import InvalidSpec
from .errors import ImageNotFound, LayerDigestMismatch, UnsupportedImage
from .registry import RegistryClient, looks_like_host, parse_registry_ref

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_INDEXES = (OCI_INDEX, DOCKER_LIST)
_IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
#: What a registry is asked for (the Accept header), images and indexes of both families.
_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
_REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}
#: Bytes of a manifest, index or config read at most (they are small JSON documents).
MAX_JSON_BYTES = 4 << 20


@dataclass(frozen=True)
class LayerSource:
    #: Digest of the blob as stored (compressed), or None where the source has none
    #: (a legacy `docker save` layer is named by an id, not a digest).
    digest: str | None
    media_type: str
    size: int | None
    open: Callable[[], BinaryIO]


@dataclass
class ImageSource(contextlib.AbstractContextManager):
    ref: str
    manifest: bytes
    manifest_digest: str
    config: bytes
    config_digest: str
    layers: list[LayerSource]
    _cleanup: list = field(default_factory=list)

    def report_bytes(self, on_bytes: Callable[[BlobProgress], None]) -> None:
        """Makes each layer's stream call ON_BYTES as its blob is read (for a progress bar)."""
        count = len(self.layers)
        self.layers = [
            LayerSource(layer.digest, layer.media_type, layer.size,
                        _counting(layer, BlobProgress(i + 1, count, layer.digest, 0,
                                                      layer.size), on_bytes))
            for i, layer in enumerate(self.layers)]

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            fn()
        self._cleanup.clear()

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class BlobProgress:
    """Bytes of layer `index` (of `count`) read so far, and its size where known."""

    index: int
    count: int
    digest: str | None
    done: int
    total: int | None


class _CountingStream(contextlib.AbstractContextManager):
    def __init__(self, raw: BinaryIO, start: BlobProgress,
                 on_bytes: Callable[[BlobProgress], None]):
        self._raw, self._state, self._on_bytes = raw, start, on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._state = replace(self._state, done=self._state.done + len(data))
            self._on_bytes(self._state)
        return data

    def close(self) -> None:
        self._raw.close()

    def __exit__(self, *exc) -> None:
        self.close()


def _counting(layer: LayerSource, start: BlobProgress,
              on_bytes: Callable[[BlobProgress], None]) -> Callable[[], BinaryIO]:
    return lambda: _CountingStream(layer.open(), start, on_bytes)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_ref(ref: str) -> str:
    """The form a ref is recorded under: transports with absolute paths, names as given,
    `docker://` refs as HOST/REPO[:TAG][@DIGEST] (docker.io's library/ spelled out)."""
    if ref.startswith("oci:"):
        path, tag = _split_oci(ref[4:])
        return f"oci:{os.path.abspath(path)}" + (f":{tag}" if tag else "")
    if ref.startswith("docker-archive:"):
        return "docker-archive:" + os.path.abspath(ref[len("docker-archive:"):])
    if ref.startswith("docker-daemon:"):
        return ref[len("docker-daemon:"):]
    if ref.startswith("docker://"):
        return str(parse_registry_ref(ref[len("docker://"):]))
    return ref


def open_source(ref: str, *, scratch: str) -> ImageSource:
    """The image REF names; `scratch` is a directory for what must be copied first.

    Raises:
        ImageNotFound, UnsupportedImage, LayerDigestMismatch (a pinned digest that does not
        match), InvalidSpec (a malformed registry ref), RegistryError.
    """
    if ref.startswith("oci:"):
        path, tag = _split_oci(ref[4:])
        return _oci_layout(os.path.abspath(path), tag, canonical_ref(ref))
    if ref.startswith("docker-archive:"):
        path = os.path.abspath(ref[len("docker-archive:"):])
        return _docker_archive(path, canonical_ref(ref))
    if ref.startswith("docker://"):
        return _registry(ref[len("docker://"):], canonical_ref(ref))
    if re.match(r"^(registry|https?)://", ref):
        raise UnsupportedImage(f"image {ref!r}: the {ref.split(':')[0]}:// form is not read; "
                               f"name a registry image docker://HOST/REPO[:TAG] or "
                               f"HOST/REPO[:TAG]")
    if ref.startswith("docker-daemon:"):
        return _docker_engine(ref[len("docker-daemon:"):], scratch)
    first, slash, _ = ref.partition("/")
    if slash and looks_like_host(first) and not _engine_holds(ref):
        return _registry(ref, ref)
    return _docker_engine(ref, scratch)


def _split_oci(rest: str) -> tuple[str, str | None]:
    # oci:DIR[:TAG]; a ':' followed by something without '/' that is not a directory is the tag
    head, sep, tail = rest.rpartition(":")
    if sep and head and "/" not in tail and not os.path.isdir(rest):
        return head, tail
    return rest, None


def _read_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UnsupportedImage(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UnsupportedImage(f"{what} is not a JSON object")
    return doc


# -- OCI image layout --------------------------------------------------------------------------


def _digest_form(digest: object, what: str) -> str:
    """DIGEST when it is sha256:<64 hex> (it names a file or a URL path: nothing else is)."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise UnsupportedImage(f"{what}: digest {digest!r} is not sha256:<64 hex> (only "
                               f"sha256 is supported)")
    return digest


def _blob_path(root: str, digest: str, what: str) -> str:
    _digest_form(digest, what)
    return os.path.join(root, "blobs", "sha256", digest[7:])


def _read_blob(root: str, digest: str, what: str) -> bytes:
    path = _blob_path(root, digest, what)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ImageNotFound(f"{what}: blob {digest} is missing from the layout") from None
    if len(data) > MAX_JSON_BYTES:
        raise UnsupportedImage(f"{what}: {digest} is larger than {MAX_JSON_BYTES} bytes")
    return data


def _host_platform() -> tuple[str, str]:
    return "linux", _GOARCH.get(os.uname().machine, os.uname().machine)


def _pick_platform(index: dict, what: str) -> dict:
    want = _host_platform()
    for desc in index.get("manifests") or []:
        plat = desc.get("platform") or {}
        if (plat.get("os"), plat.get("architecture")) == want:
            return desc
    raise ImageNotFound(f"{what}: no manifest for {want[0]}/{want[1]}")


def _oci_layout(root: str, tag: str | None, ref: str) -> ImageSource:
    try:
        with open(os.path.join(root, "index.json"), "rb") as f:
            index = _read_json(f.read(MAX_JSON_BYTES), f"{ref}: index.json")
    except FileNotFoundError:
        raise ImageNotFound(f"{ref}: {root} is not an OCI image layout (no index.json)") \
            from None
    descs = index.get("manifests") or []
    if tag is not None:
        chosen = [d for d in descs if (d.get("annotations") or {}).get(_REF_NAME) == tag]
        if not chosen:
            raise ImageNotFound(f"{ref}: no manifest tagged {tag!r} in {root}/index.json")
    else:
        chosen = descs
        if len(chosen) != 1:
            tags = sorted({(d.get("annotations") or {}).get(_REF_NAME, "?") for d in descs})
            raise ImageNotFound(f"{ref}: index.json has {len(chosen)} manifests; name one "
                                f"with oci:{root}:TAG (tags: {', '.join(tags) or 'none'})")
    desc = chosen[0]
    for _ in range(2):  # an image index (multi-platform) names one manifest per platform
        if desc.get("mediaType") not in _INDEXES:
            break
        data = _read_blob(root, desc.get("digest"), ref)
        if sha256_digest(data) != desc["digest"]:
            raise LayerDigestMismatch(f"{ref}: image index has digest {sha256_digest(data)}, "
                                      f"not {desc['digest']}; nothing was kept")
        desc = _pick_platform(_read_json(data, ref), ref)
    manifest_digest = desc.get("digest")
    manifest = _read_blob(root, manifest_digest, ref)
    doc = _read_json(manifest, f"{ref}: manifest")
    if doc.get("mediaType", desc.get("mediaType")) not in (OCI_MANIFEST, DOCKER_MANIFEST, None):
        raise UnsupportedImage(f"{ref}: manifest media type {doc.get('mediaType')!r} is not "
                               f"an image manifest")
    config_digest = (doc.get("config") or {}).get("digest")
    config = _read_blob(root, config_digest, f"{ref}: config")
    layers = []
    for layer in doc.get("layers") or []:
        path = _blob_path(root, layer.get("digest"), ref)
        layers.append(LayerSource(layer["digest"], layer.get("mediaType", ""),
                                  layer.get("size"), _opener(path, ref)))
    # the digests are the ones claimed; the store checks each against the bytes
    return ImageSource(ref, manifest, manifest_digest, config, config_digest, layers)


def _opener(path: str, ref: str) -> Callable[[], BinaryIO]:
    def open_blob() -> BinaryIO:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ImageNotFound(f"{ref}: layer blob {path} is missing") from None
    return open_blob


# -- docker save tarball -----------------------------------------------------------------------


def _docker_archive(path: str, ref: str, name: str | None = None) -> ImageSource:
    try:
        outer = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise ImageNotFound(f"{ref}: no such file {path}") from None
    except tarfile.TarError as exc:
        raise UnsupportedImage(f"{ref}: {path} is not a tar archive ({exc})") from None
    src = None
    try:
        members = {m.name.removeprefix("./"): m for m in outer.getmembers() if m.isfile()}

        def read(member_name: str, what: str) -> bytes:
            m = members.get(member_name)
            if m is None:
                raise ImageNotFound(f"{ref}: {what} {member_name!r} is not in the archive")
            if m.size > MAX_JSON_BYTES:
                raise UnsupportedImage(f"{ref}: {what} {member_name!r} is too large")
            return outer.extractfile(m).read()

        entries = json.loads(read("manifest.json", "manifest.json"))
        if not isinstance(entries, list) or not entries:
            raise UnsupportedImage(f"{ref}: manifest.json lists no image")
        if name is not None:
            wanted = [e for e in entries if name in (e.get("RepoTags") or [])]
            entry = wanted[0] if wanted else entries[0]
        elif len(entries) == 1:
            entry = entries[0]
        else:
            raise UnsupportedImage(f"{ref}: the archive holds {len(entries)} images; this "
                                   f"version imports archives of one image")
        config_name = entry.get("Config") or ""
        config = read(config_name, "config")
        config_digest = sha256_digest(config)
        hexname = os.path.basename(config_name).removesuffix(".json")
        if re.fullmatch(r"[0-9a-f]{64}", hexname) and hexname != config_digest[7:]:
            raise LayerDigestMismatch(f"{ref}: config {config_name!r} has digest "
                                      f"{config_digest}, not sha256:{hexname}")
        layers = []
        for layer_name in entry.get("Layers") or []:
            m = members.get(layer_name)
            if m is None:
                raise ImageNotFound(f"{ref}: layer {layer_name!r} is not in the archive")
            base = os.path.basename(layer_name)
            digest = ("sha256:" + base if layer_name.startswith("blobs/sha256/")
                      and re.fullmatch(r"[0-9a-f]{64}", base) else None)
            layers.append(LayerSource(digest, "", m.size,
                                      lambda m=m: outer.extractfile(m)))
        # a legacy archive has no manifest: one is written from the config and layers
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_TAR, "digest": d, "size": layers[i].size}
                       for i, d in enumerate(
                           (json.loads(config).get("rootfs") or {}).get("diff_ids") or [])
                       if i < len(layers)],
        }, sort_keys=True, separators=(",", ":")).encode()
        src = ImageSource(ref, manifest, sha256_digest(manifest), config, config_digest, layers)
        src._cleanup.append(outer.close)
        return src
    finally:
        if src is None:
            outer.close()


# -- a local Docker engine ---------------------------------------------------------------------


def _docker_engine(name: str, scratch: str) -> ImageSource:
    """Saves NAME from the engine at DOCKER_HOST (or the default socket) and reads that."""
    docker = shutil.which("docker")
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if docker is None:
        raise UnsupportedImage(f"image {name!r}: no 'docker' command to read it from a local "
                               f"engine, and {_registry_hint(name)}")
    if host.startswith("unix://") and not os.path.exists(host[len("unix://"):]):
        raise UnsupportedImage(f"image {name!r}: no Docker engine at {host} (set DOCKER_HOST), "
                               f"and {_registry_hint(name)}")
    fd, path = tempfile.mkstemp(prefix="docker-save.", suffix=".tar", dir=scratch)
    try:
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.run([docker, "save", name], stdout=out, stderr=subprocess.PIPE,
                                  env={**os.environ, "DOCKER_HOST": host}, check=False)
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace").strip().splitlines()
            why = why[-1] if why else f"exit status {proc.returncode}"
            if "No such image" in why or "reference does not exist" in why:
                raise ImageNotFound(f"image {name!r} is not in the Docker engine at {host}, "
                                    f"and {_registry_hint(name)}")
            raise UnsupportedImage(f"image {name!r}: docker save failed at {host}: {why}")
        src = _docker_archive(path, name, name=name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    src._cleanup.insert(0, lambda: os.unlink(path))
    return src


def _registry_hint(name: str) -> str:
    """What to write to pull NAME from a registry, as docker would without a host."""
    try:
        full = str(parse_registry_ref(name))
    except InvalidSpec:
        return ("pulling from a registry is not supported for a name without a registry "
                "host; name one as HOST/REPO[:TAG] or docker://HOST/REPO[:TAG]")
    return (f"pulling from a registry is not supported for a name without a registry host: "
            f"docker would pull it from its default registry (docker.io); name it {full} (or "
            f"docker://{name}) to pull from there")


def _engine_holds(name: str) -> bool:
    """Whether the local engine (DOCKER_HOST) has an image NAME; False without one."""
    docker = shutil.which("docker")
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if docker is None or (host.startswith("unix://")
                          and not os.path.exists(host[len("unix://"):])):
        return False
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", name],
                              capture_output=True, env={**os.environ, "DOCKER_HOST": host},
                              timeout=30, check=False)
        return proc.returncode == 0
    return False


# -- a registry --------------------------------------------------------------------------------


def _check_digest(data: bytes, digest: str, what: str) -> None:
    if sha256_digest(data) != _digest_form(digest, what):
        raise LayerDigestMismatch(f"{what} has digest {sha256_digest(data)}, not {digest}; "
                                  f"nothing was kept")


def _registry(name: str, ref: str) -> ImageSource:
    """The image NAME (HOST/REPO[:TAG|@DIGEST]) of a registry: its manifest (through an
    index for linux/<host arch>), config, and layers streamed from the registry."""
    rref = parse_registry_ref(name)
    client = RegistryClient(rref)
    data, media = client.manifest(rref.reference, _MANIFEST_TYPES)
    digest = rref.digest or sha256_digest(data)
    for depth in range(3):
        _check_digest(data, digest, f"{ref}: manifest {digest}")
        doc = _read_json(data, f"{ref}: manifest")
        media = doc.get("mediaType") or media
        if media not in _INDEXES:
            break
        if depth == 2:
            raise UnsupportedImage(f"{ref}: an image index names another index twice over")
        digest = _digest_form(_pick_platform(doc, ref).get("digest"), f"{ref}: index entry")
        data, media = client.manifest(digest, _MANIFEST_TYPES)
    if media not in _IMAGE_MANIFESTS:
        raise UnsupportedImage(f"{ref}: manifest media type {media!r} is not an OCI or "
                               f"Docker schema 2 image manifest")
    config_digest = _digest_form((doc.get("config") or {}).get("digest"), f"{ref}: config")
    config = client.blob_bytes(config_digest, MAX_JSON_BYTES)
    layers = []
    for layer in doc.get("layers") or []:
        blob = _digest_form(layer.get("digest"), f"{ref}: layer")
        layers.append(LayerSource(blob, layer.get("mediaType", ""), layer.get("size"),
                                  functools.partial(client.open_blob, blob)))
    # the config and each layer are hashed by the store against these digests
    return ImageSource(ref, data, digest, config, config_digest, layers)


def push_image(src_ref: str, dest: str, *, scratch: str) -> str:
    """Sends the image SRC_REF (any source) to the registry image DEST: each blob the
    repository lacks, then the manifest under DEST's tag. Returns the manifest's digest.

    Raises:
        InvalidSpec (DEST), RegistryError, RegistryAuthError, and open_source's errors.
    """
    rref = parse_registry_ref(dest.removeprefix("docker://"))
    if rref.digest:
        raise InvalidSpec("image", f"{dest!r}: push to a tag, not a digest (the registry "
                                   f"names the manifest by its digest itself)")
    client = RegistryClient(rref)
    with open_source(src_ref, scratch=scratch) as src:
        doc = _read_json(src.manifest, f"{src.ref}: manifest")
        described = doc.get("layers") or []
        if len(described) != len(src.layers):
            raise UnsupportedImage(f"{src.ref}: the manifest lists {len(described)} layers "
                                   f"for {len(src.layers)} blobs")
        for layer, desc in zip(src.layers, described, strict=True):
            digest, size = layer.digest or desc["digest"], layer.size or desc["size"]
            client.push_blob(digest, size, layer.open)
        client.push_blob(src.config_digest, len(src.config), src.config)
        media = doc.get("mediaType") or OCI_MANIFEST
        client.push_manifest(rref.tag or "latest", src.manifest, media)
        return src.manifest_digest
