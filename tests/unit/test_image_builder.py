"""Builds real images for the image store's tests: layer tars, OCI layouts, docker save
tarballs, written with tarfile (no engine, no registry). Holds no tests of its own but one
that checks the builder writes what OCI tools read."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

MTIME = 1_700_000_000


@dataclass
class Layer:
    """A layer's tar entries; `tar()` is the uncompressed layer, `blob()` as shipped."""

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)
    compress: bool = True

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Layer:
        return self._add(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0,
             gid: int = 0, xattrs: dict[str, bytes] | None = None) -> Layer:
        pax = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
               for k, v in (xattrs or {}).items()}
        return self._add(name, tarfile.REGTYPE, data=data, mode=mode, uid=uid, gid=gid,
                         pax=pax)

    def symlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.SYMTYPE, linkname=target, mode=0o777)

    def hardlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.LNKTYPE, linkname=target)

    def fifo(self, name: str, mode: int = 0o620) -> Layer:
        return self._add(name, tarfile.FIFOTYPE, mode=mode)

    def device(self, name: str, major: int, minor: int) -> Layer:
        info = self._info(name, tarfile.CHRTYPE, mode=0o666)
        info.devmajor, info.devminor = major, minor
        self.entries.append((info, None))
        return self

    def whiteout(self, path: str) -> Layer:
        head, _, base = path.rpartition("/")
        return self.file((head + "/" if head else "") + ".wh." + base)

    def opaque(self, dir_path: str) -> Layer:
        return self.file(dir_path.rstrip("/") + "/.wh..wh..opq")

    def _info(self, name, kind, *, mode=0o644, uid=0, gid=0, linkname="", pax=None):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
        info.linkname, info.mtime = linkname, MTIME
        info.pax_headers = dict(pax or {})
        return info

    def _add(self, name, kind, *, data=None, **kw) -> Layer:
        info = self._info(name, kind, **kw)
        if data is not None:
            info.size = len(data)
        self.entries.append((info, data))
        return self

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for info, data in self.entries:
                # tarfile would strip nothing; names are written exactly as given
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()

    def blob(self) -> bytes:
        raw = self.tar()
        return gzip.compress(raw, mtime=0) if self.compress else raw


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(layers: list[Layer], diff_ids: list[str] | None = None) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "IMAGE=test"], "Cmd": ["/bin/sh"],
                   "WorkingDir": "/opt"},
        "rootfs": {"type": "layers",
                   "diff_ids": diff_ids or [digest(layer.tar()) for layer in layers]},
    }, sort_keys=True).encode()


def _put_blob(root: str, data: bytes) -> str:
    d = digest(data)
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(root, "blobs", "sha256", d[7:]), "wb") as f:
        f.write(data)
    return d


def write_oci(root: str, layers: list[Layer], tag: str = "latest", *,
              config: bytes | None = None) -> str:
    """Writes an OCI image layout at ROOT; returns its ref `oci:ROOT:TAG`."""
    os.makedirs(root, exist_ok=True)
    config = config or config_for(layers)
    descs = []
    for layer in layers:
        blob = layer.blob()
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if layer.compress else "")
        descs.append({"mediaType": media, "digest": _put_blob(root, blob), "size": len(blob)})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _put_blob(root, config), "size": len(config)},
        "layers": descs}).encode()
    index_path = os.path.join(root, "index.json")
    index = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _put_blob(root, manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(index_path, "w") as f:
        json.dump(index, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return f"oci:{root}:{tag}"


def write_docker_archive(path: str, layers: list[Layer], tag: str = "test/image:1", *,
                         blobs: bool = False) -> str:
    """Writes a `docker save` tarball (uncompressed layers) as Docker before 25 did, or with
    `blobs` as Docker 25+ does (config and layers under blobs/sha256/); returns its ref."""
    config = config_for(layers)
    config_name = ("blobs/sha256/" if blobs else "") + digest(config)[7:] + (
        "" if blobs else ".json")
    members: list[tuple[str, bytes]] = [(config_name, config)]
    names = []
    for i, layer in enumerate(layers):
        name = (f"blobs/sha256/{digest(layer.tar())[7:]}" if blobs
                else f"{i:064x}/layer.tar")
        members.append((name, layer.tar()))
        names.append(name)
    members.append(("manifest.json", json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": names}]).encode()))
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return f"docker-archive:{path}"


def sample_layers() -> list[Layer]:
    """Three layers: a base with every kind of entry, a change set with a whiteout and an
    opaque directory, an uncompressed top layer."""
    base = (Layer()
            .dir("etc").file("etc/hostname", b"base\n")
            .file("etc/owned", b"x", mode=0o640, uid=1000, gid=1001)
            .file("etc/suid", b"#!/bin/false\n", mode=0o4755)
            .file("etc/xattr", b"x", xattrs={"user.corral": b"hello"})
            .dir("usr").dir("usr/bin")
            .file("usr/bin/tool", b"tool\n", mode=0o755)
            .hardlink("usr/bin/tool-link", "usr/bin/tool")
            .symlink("bin", "usr/bin")
            .symlink("usr/abs", "/etc/hostname")
            .file("usr/sparse", bytes(8 << 20) + b"end")
            .dir("run", mode=0o1777).fifo("run/pipe")
            .dir("ro", mode=0o555).file("ro/inside", b"r")
            .dir("opt").dir("opt/data").file("opt/data/a", b"a").file("opt/data/b", b"b"))
    change = (Layer()
              .whiteout("etc/hostname")
              .dir("opt").dir("opt/data").opaque("opt/data").file("opt/data/c", b"c")
              .file("new/implicit/parent", b"made"))
    top = Layer(compress=False).file("top", b"top\n")
    return [base, change, top]


def test_builder_writes_a_layout_with_matching_digests(tmp_path):
    ref = write_oci(str(tmp_path / "img"), sample_layers())
    assert ref == f"oci:{tmp_path}/img:latest"
    with open(tmp_path / "img" / "index.json") as f:
        index = json.load(f)
    manifest_digest = index["manifests"][0]["digest"]
    with open(tmp_path / "img" / "blobs" / "sha256" / manifest_digest[7:], "rb") as f:
        data = f.read()
    assert digest(data) == manifest_digest
    assert [layer["mediaType"].rsplit(".", 1)[1] for layer in json.loads(data)["layers"]] == [
        "tar+gzip", "tar+gzip", "tar"]
