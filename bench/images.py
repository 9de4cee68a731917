"""Cold registry pull: Corral's pull + unpack against `docker pull`, of one image, one run.

Builds an image of about --megabytes MB (a gzip layer of real files from the host's
/usr/lib, plus a small top layer), pushes it to a local Debian `docker-registry` on
127.0.0.1, and starts a private dockerd (bench/spawn.py's PrivateEngine). Then, for
--rounds rounds, alternating which goes first:

* corral: `ImageStore(fresh dir).pull(REF)`: manifest, config, each blob streamed from the
  registry, verified and unpacked into the layer store (the directory is removed after);
* docker: `docker pull REF` into the private engine (the registry is on 127.0.0.1, which
  docker treats as insecure), then `docker rmi` and a prune of its build cache, untimed.

Prints one JSON object: corral_pull_ms and docker_pull_ms (p50 and each round), ratio
(corral p50 / docker p50; the target is <= 1), the image's sizes. Needs root (dockerd).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

SIZES = {
    "rounds": harness.Size(3, 1, "alternating rounds of each candidate"),
    "megabytes": harness.Size(100, 10, "uncompressed size of the image's big layer (MB)"),
}
SOURCE_DIR = "/usr/lib/x86_64-linux-gnu"
#: Files larger than this are left out: the layer is many files (as a distribution's are),
#: not a few huge libraries (libLLVM alone is over 100 MB).
MAX_FILE_BYTES = 4 << 20


def _files(limit: int) -> list[str]:
    """Regular files (up to MAX_FILE_BYTES) and symlinks under SOURCE_DIR, in a stable
    order, to about LIMIT bytes."""
    chosen, total = [], 0
    for top, dirs, files in os.walk(SOURCE_DIR):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            if not (os.path.islink(path) or os.path.isfile(path)) \
                    or st.st_size > MAX_FILE_BYTES and not os.path.islink(path):
                continue
            chosen.append(path)
            total += st.st_size if not os.path.islink(path) else 0
            if total >= limit:
                return chosen
    return chosen


def _sha256_file(path: str) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return "sha256:" + sha.hexdigest(), size


def _put_blob(layout: str, path: str) -> dict:
    digest, size = _sha256_file(path)
    os.replace(path, os.path.join(layout, "blobs", "sha256", digest[7:]))
    return {"digest": digest, "size": size}


def build_layout(workdir: str, megabytes: int) -> tuple[str, dict]:
    """An OCI layout of a big layer (host files) and a small one; (its ref, sizes)."""
    layout = os.path.join(workdir, "layout")
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    descs, diff_ids = [], []
    big = _files(megabytes * 1_000_000)
    for name, members in (("big", big), ("top", None)):
        tar_path = os.path.join(workdir, name + ".tar")
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
            if members is None:
                data = b"bench image\n"
                info = tarfile.TarInfo("etc/bench-image")
                info.size, info.mtime = len(data), 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
            for path in members or []:
                tf.add(path, arcname=path.lstrip("/"), recursive=False)
        diff_ids.append(_sha256_file(tar_path)[0])
        gz_path = tar_path + ".gz"
        with open(tar_path, "rb") as src, gzip.open(gz_path, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.unlink(tar_path)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      **_put_blob(layout, gz_path)})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_write_small(layout, config)},
        "layers": descs}).encode()
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **_write_small(layout, manifest),
            "annotations": {"org.opencontainers.image.ref.name": "1"}}]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return f"oci:{layout}:1", {"blob_bytes": sum(d["size"] for d in descs),
                               "files": len(big)}


def _write_small(layout: str, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def corral_pull(ref: str, workdir: str) -> float:
    from corral.sandbox.images import ImageStore

    root = tempfile.mkdtemp(prefix="store.", dir=workdir)
    try:
        t0 = time.perf_counter()
        ImageStore(root).pull(ref)
        return (time.perf_counter() - t0) * 1000
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", root], check=True)


def docker_pull(ref: str, url: str) -> float:
    docker = ["docker", "-H", url]
    t0 = time.perf_counter()
    subprocess.run([*docker, "pull", "-q", ref], check=True, capture_output=True)
    ms = (time.perf_counter() - t0) * 1000
    subprocess.run([*docker, "rmi", ref], check=True, capture_output=True)
    subprocess.run([*docker, "image", "prune", "-af"], check=True, capture_output=True)
    return ms


def run(rounds: int, megabytes: int) -> dict:
    from corral.sandbox.backends.docker.private_engine import PrivateEngine
    from corral.sandbox.images.sources import push_image
    from tests.linux.registry_server import docker_registry

    workdir = tempfile.mkdtemp(prefix="corral-bench-images.")
    engine = None
    try:
        layout_ref, sizes = build_layout(workdir, megabytes)
        with docker_registry(os.path.join(workdir, "registry")) as host:
            ref = f"{host}/bench:1"
            push_image(layout_ref, ref, scratch=workdir)
            engine = PrivateEngine().start()
            times: dict[str, list[float]] = {"corral": [], "docker": []}
            for i in range(rounds):
                order = ["corral", "docker"] if i % 2 == 0 else ["docker", "corral"]
                for name in order:
                    times[name].append(corral_pull(ref, workdir) if name == "corral"
                                       else docker_pull(ref, engine.url))
    finally:
        if engine is not None:
            engine.stop()
        subprocess.run(["rm", "-rf", "--one-file-system", workdir], check=False)
    out = {f"{name}_pull_ms_p50": round(statistics.median(values), 1)
           for name, values in times.items()}
    out.update({f"{name}_pull_ms": [round(v, 1) for v in values]
                for name, values in times.items()})
    out["ratio"] = round(out["corral_pull_ms_p50"] / out["docker_pull_ms_p50"], 3)
    out.update(sizes, rounds=rounds, uncompressed_mb_target=megabytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_sizes(parser, SIZES)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    harness.apply_quick(args, SIZES)
    harness.require_root("a private dockerd and the layer store's ownership")
    harness.emit(run(args.rounds, args.megabytes), args.json)


if __name__ == "__main__":
    main()
