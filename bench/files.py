"""File transfer throughput: `corral cp` (and the Python client) against `docker cp`.

Makes one file of --size bytes of random data (default 2 GiB), then, RUNS times, copies it
into a sandbox and back out with each candidate, in the same run, candidates alternating
which goes first (and `sync` before each timed copy, so none pays for another's writeback):

| candidate       | upload                                  | download                         |
|-----------------|-----------------------------------------|----------------------------------|
| `corral_cp`     | `corral cp FILE SB:big.bin` (a process) | `corral cp SB:big.bin OUT`       |
| `corral_client` | `Client.upload` in this process         | `Client.download`                |
| `docker_cp`     | `docker cp FILE CTR:/big.bin`           | `docker cp CTR:/big.bin OUT`     |

Corral's side is a real `corral daemon` with a workspace cap big enough for the file (a
tmpfs); Docker's is a private dockerd (sandbox/backends/docker/private_engine.py) with
Corral's base image imported from the host, the container created but not started (docker cp
works on it all the same). Every download is checked afterwards with sha256 against the
source, outside the timing; Corral's own transfers are also checked end to end by the
daemon's digest (included in the timing: it is part of every Corral copy). Downloads land
on a tmpfs (--out-dir, default /dev/shm) for every candidate alike, so that the local disk's
writeback, shared with whatever else the host runs, does not decide the figures.

Prints one JSON object: {"bytes", "runs": [{candidate: {"upload_mb_s", "download_mb_s"}}],
"summary": {candidate: {"upload_worst", "upload_best", "download_worst",
"download_best"}}, "docker_storage_driver", "exact"} (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import harness

from corral.runtime.client import Client
from corral.sandbox.spec import parse_size

CANDIDATES = ("corral_cp", "corral_client", "docker_cp")


def make_source(path: str, size: int) -> str:
    block = bytearray(os.urandom(1 << 20))
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size >> 20):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def timed(fn) -> float:
    os.sync()  # the previous copy's dirty pages are not this one's to write back
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_cmd(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{argv[:3]} exited {done.returncode}: {done.stderr.decode()[-500:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G", help="bytes of the file (default 2G)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the source goes (default: a "
                                                    "temporary directory)")
    parser.add_argument("--out-dir", default="/dev/shm",
                        help="where downloads land (default /dev/shm, a tmpfs: the local "
                             "disk's writeback, shared with whatever else runs, is not what "
                             "is measured; '' = next to the source)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the engine and daemon
    size = parse_size(args.size, "size")
    root = tempfile.mkdtemp(prefix="corral-bench-files-", dir=args.dir)
    src = os.path.join(root, "src.bin")
    want = make_source(src, size)
    docker_bin = shutil.which("docker")
    if docker_bin is None:
        raise SystemExit("bench/files.py: the docker CLI is not installed")

    from corral.sandbox.backends import docker as backend
    from corral.sandbox.backends.docker.private_engine import PrivateEngine

    engine = PrivateEngine().start()
    proc = None
    client = None
    container = None
    out_dir = None
    try:
        api = backend.client(engine.url)
        image = backend.base_image(engine.url)
        container = api.create_container(image, command=["sleep", "infinity"])["Id"]
        driver = api.info().get("Driver", "")
        proc, socket = harness.start_daemon(root, "--workspace-size", str(size + (256 << 20)))
        client = Client.connect(socket=socket)
        sb = client.create_sandbox()
        corral_cli = [sys.executable, "-m", "corral.runtime.cli", "cp", "--socket", socket,
                      "-q"]
        docker_cli = [docker_bin, "-H", engine.url, "cp", "-q"]
        out_dir = tempfile.mkdtemp(prefix="corral-bench-files-out-", dir=args.out_dir) \
            if args.out_dir else root
        out = os.path.join(out_dir, "out.bin")

        def up(name: str) -> float:
            if name == "corral_cp":
                return timed(lambda: run_cmd([*corral_cli, src, f"{sb.id}:big.bin"]))
            if name == "corral_client":
                return timed(lambda: client.upload(sb.id, "big.bin", src))
            return timed(lambda: run_cmd([*docker_cli, src, f"{container}:/big.bin"]))

        def down(name: str) -> float:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out)
            if name == "corral_cp":
                return timed(lambda: run_cmd([*corral_cli, f"{sb.id}:big.bin", out]))
            if name == "corral_client":
                return timed(lambda: client.download(sb.id, "big.bin", out))
            return timed(lambda: run_cmd([*docker_cli, f"{container}:/big.bin", out]))

        runs, exact = [], True
        for i in range(args.runs):
            order = CANDIDATES[i % 3:] + CANDIDATES[:i % 3]
            result = {}
            for name in order:
                upload_s = up(name)
                download_s = down(name)
                exact = exact and sha256(out) == want
                result[name] = {"upload_mb_s": round(size / upload_s / 1e6, 1),
                                "download_mb_s": round(size / download_s / 1e6, 1)}
            runs.append(result)
        summary = {}
        for name in CANDIDATES:
            ups = [r[name]["upload_mb_s"] for r in runs]
            downs = [r[name]["download_mb_s"] for r in runs]
            summary[name] = {"upload_worst": min(ups), "upload_best": max(ups),
                             "download_worst": min(downs), "download_best": max(downs)}
        print(json.dumps({"bytes": size, "runs": runs, "summary": summary,
                          "docker_storage_driver": driver, "exact": exact}))
        return 0 if exact else 1
    finally:
        if client is not None:
            client.close()
        if proc is not None:
            harness.stop_daemon(proc, 60)
        if container is not None:
            with contextlib.suppress(Exception):
                backend.client(engine.url).remove_container(container, force=True)
        engine.stop()
        shutil.rmtree(root, ignore_errors=True)
        if out_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
