"""Spawn latency: create + exec + wait + destroy of /bin/true, Corral vs bwrap vs unshare.

Every candidate runs from this one warm Python process, round-robin within each iteration
(the starting candidate rotates), so that noise and drift hit all of them alike:

  corral    Sandbox.create() + exec(["/bin/true"]) + wait() + destroy(), native backend,
            default spec (fresh temp workspace, cgroup limits, landlock, seccomp "default")
  corral_run  corral.sandbox.run(["/bin/true"]): the same sandbox and command as one-shot,
            as `corral run` and bwrap do it (PID 1 starts the command itself: no join),
            stdout/stderr piped and read to the end
  bwrap     subprocess.run(bwrap ... /bin/true) with the closest equivalent flags: all
            namespaces, same read-only host view and generated /etc, /proc, /dev, tmpfs /tmp
            with the same size cap, a fresh temp workspace at /workspace (made and removed
            inside the timed region, as Corral does), no capabilities, new session, the same
            compiled seccomp BPF passed through a memfd
  unshare   subprocess.run(unshare --user --map-root-user --pid --fork --mount --net --uts
            --ipc /bin/true): the namespaces alone, no filesystem view, no seccomp
  spawn_*   /bin/true without any sandbox, by posix_spawn (vfork) and by fork+exec: what
            creating a child of this Python process costs before any isolation

Rootless (as root, unless --no-rootless): the same create + exec + wait + destroy run by an
ordinary user (a temporary one unless --rootless-user names one), next to bwrap as that
user, round-robin in one process of theirs: `rootless_ms_p50` (the user's subordinate ids
mapped through newuidmap/newgidmap), `rootless_single_ms_p50` (only the user mapped, as
bwrap does) and `bwrap_rootless_ms_p50`. No cgroup there (v1 cannot be delegated).

Then the cold CLI, `corral run -- /bin/true` as a new process (`cli_ms_p50`), next to the
bare interpreter start (`python_startup_ms_p50`), and, with --profile, where Corral's
time goes inside its own functions (wrappers installed by this script only).

  bench/spawn.py [--iterations N] [--warmup N] [--cli-iterations N] [--quick] [--json]
                 [--profile] [--no-cli] [--no-rootless] [--rootless-user NAME]
                 [--rootless-iterations N] [--pools]

With --pools (root), Create through a real daemon: a warm-pool hit (`pool_create_ms_p50`)
against a cold create (`cold_create_ms_p50`) in the same run, at the client and at the
daemon (bench/pools.py has the method).

Times are milliseconds of time.perf_counter(); p99 is the nearest-rank percentile. The
JSON object has at least corral_ms_p50, corral_ms_p99, bwrap_ms_p50, bwrap_ms_p99,
unshare_ms_p50, bwrap_bare_ms_p50 (issue 21's floor: `bwrap --unshare-all --die-with-parent
--new-session` with a read-only /usr, proc, dev and a tmpfs /tmp), corral_run_ms_p50 with
ratio_default_vs_bwrap_bare_p50 (corral_run over bwrap_bare, as issue 21 states it), and
cli_ms_p50; with a Docker engine (a private dockerd is
started unless --docker-host names one) also docker_backend_ms_p50 (create + exec + wait +
destroy through Corral's docker backend) and docker_run_ms_p50 (plain `docker run --rm IMAGE
/bin/true`), measured round-robin with native Corral (corral and corral_run) in a separate,
shorter run (--docker-iterations): ratio_docker_run_vs_corral_run_p50 compares like with
like (both one-shot).

Images (as root, unless --no-image): `image_ms_p50` is the corral candidate on a small image
of /bin/true and its libraries (spec.image, layers already unpacked in a private store),
round-robin with `corral_ms_p50` (host /usr) and `docker_run_image_ms_p50` (`docker run
--rm` of the same image, loaded into the engine); ratio_image_vs_corral_p50 (target <= 1.3)
and ratio_docker_run_image_vs_image_p50 (target >= 20), over --image-iterations rounds.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import harness

DEVNULL = subprocess.DEVNULL

#: What the bwrap command cannot express, so its figure buys less isolation than Corral's.
BWRAP_GAPS = [
    "no cgroup: no memory (no swap), pids or CPU limits and no cgroup-wide kill; Corral "
    "creates and removes one cgroup per sandbox in every v1 hierarchy (mkdir/rmdir)",
    "no landlock: Corral's command is also confined to writing /workspace, /tmp, /dev/shm "
    "and terminals by a landlock ruleset",
    "no rlimits: Corral sets nofile, core=0 and fsize",
    "id mapping: bwrap maps root inside to the caller's uid (here uid "
    f"{os.getuid()}); Corral maps root inside to an unprivileged host id (uid_base)",
    "bwrap's /proc hides less: Corral also masks kcore, kallsyms, keys, timer_list, "
    "sched_debug and friends and makes /proc/{sys,irq,bus,fs,sysvipc} read-only",
    "one-shot: bwrap runs one command; a Corral sandbox keeps a PID-1 reaper so that later "
    "exec() calls join it; the corral figure includes starting that reaper, joining it "
    "(setns) and tearing it down, corral_run has PID 1 start the command (no join)",
    "state: Corral writes a state file and sweeps sandboxes of dead callers; bwrap keeps "
    "no state",
]

UNSHARE_GAPS = [
    "namespaces only: no new root, no read-only host view, no /proc or /dev of its own, no "
    "seccomp, no capability drop, no cgroup, no landlock",
]


# -- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    """The figures of one candidate's times (ms): p50, p99, mean, min, max."""
    return {
        "p50": round(statistics.median(values), 3),
        "p99": round(percentile(values, 99), 3),
        "mean": round(statistics.fmean(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def ms_columns(summaries: dict[str, dict[str, float]]) -> dict[str, float]:
    """The result's flat keys of candidates' summaries: {name}_ms_{p50, p99, ...}."""
    return {f"{name}_ms_{key}": value for name, figures in summaries.items()
            for key, value in figures.items()}


def ratio_columns(r: dict[str, float]) -> dict[str, float]:
    """The ratios of the main round: issue 21's ratio_default_vs_bwrap_bare_* is run() of
    the default policy (corral_run) against the bare bwrap command; the corral figures
    (create + exec + wait + destroy) stand next to them as before."""
    return {
        "ratio_default_vs_bwrap_bare_p50": round(r["corral_run_ms_p50"]
                                                 / r["bwrap_bare_ms_p50"], 3),
        "ratio_default_vs_bwrap_bare_p99": round(r["corral_run_ms_p99"]
                                                 / r["bwrap_bare_ms_p99"], 3),
        "ratio_corral_vs_bwrap_bare_p50": round(r["corral_ms_p50"] / r["bwrap_bare_ms_p50"], 3),
        "ratio_corral_vs_bwrap_p50": round(r["corral_ms_p50"] / r["bwrap_ms_p50"], 3),
        "ratio_corral_vs_bwrap_p99": round(r["corral_ms_p99"] / r["bwrap_ms_p99"], 3),
    }


# -- candidates ----------------------------------------------------------------------------


class CorralCandidate:
    """Create + exec + wait + destroy through the Python API, timing each phase."""

    def __init__(self, name: str = "corral") -> None:
        from corral.sandbox import DEVNULL as CORRAL_DEVNULL
        from corral.sandbox import Sandbox, SandboxSpec

        self.name = name
        self._sandbox_cls = Sandbox
        self._spec = SandboxSpec()
        self._devnull = CORRAL_DEVNULL
        self.phases: dict[str, list[float]] = {"start": [], "exec": [], "wait": [], "destroy": []}

    def __call__(self) -> float:
        t0 = time.perf_counter()
        sandbox = self._sandbox_cls(self._spec)
        try:
            sandbox.start()
            t1 = time.perf_counter()
            proc = sandbox.exec(["/bin/true"], stdin=self._devnull, stdout=self._devnull,
                                stderr=self._devnull)
            t2 = time.perf_counter()
            code = proc.wait()
            t3 = time.perf_counter()
        finally:
            sandbox.destroy()
        t4 = time.perf_counter()
        if code != 0:
            raise RuntimeError(f"corral: /bin/true exited {code}")
        for key, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            self.phases[key].append(dt * 1000)
        return (t4 - t0) * 1000


class CorralRunCandidate:
    """corral.sandbox.run(["/bin/true"]): a one-shot sandbox, as `corral run` makes one.

    Timed until run() returns (every process of the sandbox dead). The removal of its
    directories that run() leaves to the undertaker thread is then waited for, untimed,
    so that it never runs beside the next candidate; `settled` holds run() plus that wait
    (the whole cost, as a caller that waited for the directories to go would see it)."""

    def __init__(self, name: str = "corral_run") -> None:
        from corral.sandbox import run

        self.name = name
        from corral.sandbox.undertaker import undertaker

        self._run = run
        self._undertaker = undertaker
        self.settled: list[float] = []

    def __call__(self) -> float:
        t0 = time.perf_counter()
        done = self._run(["/bin/true"])
        t1 = time.perf_counter()
        self._undertaker.flush()
        self.settled.append((time.perf_counter() - t0) * 1000)
        if done.returncode != 0:
            raise RuntimeError(f"corral run: /bin/true exited {done.returncode}")
        return (t1 - t0) * 1000


class BwrapCandidate:
    """bwrap with the flags closest to Corral's default policy, via subprocess.run."""

    name = "bwrap"

    def __init__(self, bwrap: str) -> None:
        from corral.sandbox import SandboxSpec, mounts, seccomp

        spec = SandboxSpec()
        self._fds: list[int] = []
        bpf = seccomp.prepare(seccomp.load_profile(spec.profile))
        args = [bwrap, "--unshare-all", "--uid", "0", "--gid", "0", "--hostname", spec.hostname,
                "--die-with-parent", "--new-session", "--clearenv"]
        for entry in spec.environment():
            key, _, value = entry.partition("=")
            args += ["--setenv", key, value]
        for path in mounts.HOST_SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for name, content in mounts.etc_files(spec).items():
            args += ["--perms", "0644", "--ro-bind-data", str(self._memfd(content.encode())),
                     "/etc/" + name]
        for path in mounts.HOST_ETC_ENTRIES:
            args += ["--ro-bind-try", path, path]
        args += ["--proc", "/proc", "--dev", "/dev",
                 "--size", str(spec.tmp_bytes), "--tmpfs", "/tmp",
                 "--bind", "{workspace}", "/workspace", "--chdir", "/workspace",
                 "--cap-drop", "ALL"]
        if bpf is not None:
            args += ["--seccomp", str(self._memfd(bpf))]
        self.argv = args + ["/bin/true"]
        self._ws_index = self.argv.index("{workspace}")

    def _memfd(self, data: bytes) -> int:
        fd = os.memfd_create("corral-bench", 0)
        os.write(fd, data)
        self._fds.append(fd)
        return fd

    def __call__(self) -> float:
        t0 = time.perf_counter()
        workspace = tempfile.mkdtemp(prefix="corral-bench-bwrap-")
        argv = list(self.argv)
        argv[self._ws_index] = workspace
        for fd in self._fds:  # bwrap reads each to EOF; the offset is shared with us
            os.lseek(fd, 0, os.SEEK_SET)
        try:
            code = subprocess.run(argv, pass_fds=self._fds, stdin=DEVNULL, stdout=DEVNULL,
                                  stderr=DEVNULL).returncode
            dt = (time.perf_counter() - t0) * 1000
            if code != 0:  # once more, untimed, to say why
                for fd in self._fds:
                    os.lseek(fd, 0, os.SEEK_SET)
                why = subprocess.run(argv, pass_fds=self._fds, stdin=DEVNULL,
                                     capture_output=True).stderr.decode(errors="replace")
                raise RuntimeError(f"bwrap exited {code}: {why.strip()}")
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        return dt

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


class CommandCandidate:
    """Any argv through subprocess.run (vfork + exec in CPython 3.11)."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv

    def __call__(self) -> float:
        t0 = time.perf_counter()
        code = subprocess.run(self.argv, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL).returncode
        dt = (time.perf_counter() - t0) * 1000
        if code != 0:
            raise RuntimeError(f"{self.name}: {' '.join(self.argv)} exited {code}")
        return dt


def bwrap_bare_argv(bwrap: str) -> list[str]:
    """Issue 21's floor: bwrap with namespaces only (read-only /usr, proc, dev, a tmpfs /tmp),
    none of Corral's cgroup, seccomp, landlock, id map or workspace."""
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for link in ("bin", "sbin", "lib", "lib64"):  # merged-/usr: the top-level links
        if os.path.islink(f"/{link}"):
            argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    return [*argv, "/bin/true"]


class DockerBackendCandidate:
    """Create + exec + wait + destroy of /bin/true through Corral's docker backend."""

    name = "docker_backend"

    def __init__(self, url: str) -> None:
        from corral.sandbox import DEVNULL as CORRAL_DEVNULL
        from corral.sandbox import SandboxSpec
        from corral.sandbox.backends.docker import DockerSandbox

        self._cls = DockerSandbox
        self._spec = SandboxSpec(backend="docker")
        self._url = url
        self._devnull = CORRAL_DEVNULL

    def __call__(self) -> float:
        t0 = time.perf_counter()
        sandbox = self._cls(self._spec, docker_host=self._url)
        try:
            sandbox.start()
            code = sandbox.exec(["/bin/true"], stdin=self._devnull, stdout=self._devnull,
                                stderr=self._devnull).wait()
        finally:
            sandbox.destroy()
        dt = (time.perf_counter() - t0) * 1000
        if code != 0:
            raise RuntimeError(f"docker backend: /bin/true exited {code}")
        return dt


class RootlessCorralCandidate(CorralCandidate):
    """CorralCandidate run by an unprivileged user; ids="single" maps only the user (as
    bwrap does), "auto" uses the user's subordinate range through newuidmap/newgidmap."""

    def __init__(self, name: str, ids: str) -> None:
        super().__init__()
        self.name = name
        self._ids = ids

    def __call__(self) -> float:
        os.environ["CORRAL_ROOTLESS_IDS"] = self._ids
        return super().__call__()


def rootless_worker(iterations: int, warmup: int, bwrap: str) -> dict:
    """Run as the unprivileged user: Corral (both id maps) and bwrap, round-robin."""
    bw = BwrapCandidate(bwrap)
    bw.name = "bwrap_rootless"
    candidates = [RootlessCorralCandidate("rootless", "auto"),
                  RootlessCorralCandidate("rootless_single", "single"), bw]
    try:
        times = round_robin(candidates, iterations, warmup)
    finally:
        bw.close()
    return {name: summary(values) for name, values in times.items()}


#: Where the bench keeps the interpreter an unprivileged user runs it with.
USER_VENV_CACHE = "/var/cache/corral-bench"


def user_python() -> str:
    """A Python every user can run that imports this checkout's corral.

    The build venv's interpreter may live under /root (0700): make a venv from
    /usr/bin/python3 (it must be the same minor version: the extensions are built for it)
    whose .pth files add the build venv's site-packages and Corral's editable finder.
    """
    import hashlib
    import sysconfig
    from pathlib import Path

    system = "/usr/bin/python3"
    version = subprocess.run([system, "-c", "import sys; print(sys.version)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if not version.startswith(f"{sys.version_info.major}.{sys.version_info.minor}."):
        raise RuntimeError(f"{system} is {version.split()[0]}; the extensions are built for "
                           f"{sys.version_info.major}.{sys.version_info.minor}")
    site = sysconfig.get_paths()["purelib"]
    finder = next(Path(site).glob("__editable___corral_*_finder.py"))
    key = hashlib.sha256(f"{version}\0{site}\0{finder.read_text()}".encode()).hexdigest()[:16]
    venv = Path(USER_VENV_CACHE) / f"venv-{key}"
    if not (venv / ".ready").exists():
        Path(USER_VENV_CACHE).mkdir(mode=0o755, parents=True, exist_ok=True)
        subprocess.run([system, "-m", "venv", "--without-pip", "--clear", str(venv)],
                       check=True)
        own = next((venv / "lib").glob("python3*/site-packages"))
        (own / "00-corral-deps.pth").write_text(site + "\n")
        (own / "zz-corral.pth").write_text(f"import {finder.stem}; {finder.stem}.install()\n")
        (venv / ".ready").write_text(version + "\n")
    return str(venv / "bin" / "python")


def rootless_columns(iterations: int, warmup: int, user: str | None) -> dict:
    """rootless_ms_* (Corral as an ordinary user, its subordinate ids mapped),
    rootless_single_ms_* (only the user mapped) and bwrap_rootless_ms_* (bwrap as the same
    user), round-robin in one process of that user. Without --rootless-user a temporary
    user is made (useradd, which gives it subordinate ids) and removed afterwards."""
    import pwd

    made = None
    if user is None:
        made = user = "corralbench" + os.urandom(3).hex()
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", user], check=True)
    try:
        pw = pwd.getpwnam(user)
        os.chmod(pw.pw_dir, 0o755)
        proc = subprocess.run(
            [user_python(), os.path.abspath(__file__), "--rootless-worker", "--iterations",
             str(iterations), "--warmup", str(warmup)],
            user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], cwd=pw.pw_dir,
            env={"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"the rootless worker exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:]}")
        times = json.loads(proc.stdout)
    finally:
        if made is not None:
            subprocess.run(["userdel", "--remove", made], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(f"/tmp/corral-{pw.pw_uid}", ignore_errors=True)
    out: dict = {"user": user, "iterations": iterations, "warmup": warmup, **ms_columns(times)}
    out["ratio_rootless_vs_bwrap_p50"] = round(out["rootless_ms_p50"]
                                               / out["bwrap_rootless_ms_p50"], 3)
    out["ratio_rootless_single_vs_bwrap_p50"] = round(out["rootless_single_ms_p50"]
                                                      / out["bwrap_rootless_ms_p50"], 3)
    return out


def docker_columns(iterations: int, warmup: int, url: str | None) -> dict:
    """Native Corral vs the docker backend vs plain `docker run --rm`, round-robin in this
    run. Uses the engine at url, else starts a private dockerd (removed afterwards)."""
    from corral.sandbox.backends import docker as docker_backend
    from corral.sandbox.backends.docker.private_engine import PrivateEngine

    cli = shutil.which("docker")
    if cli is None:
        return {"error": "the docker CLI is not installed (apt-get install docker.io)"}
    engine = None
    try:
        if url is None:
            engine = PrivateEngine().start()
            url = engine.url
        image = docker_backend.base_image(url)
        candidates = [
            CorralCandidate(),
            CorralRunCandidate(),
            DockerBackendCandidate(url),
            CommandCandidate("docker_run", [cli, "-H", url, "run", "--rm", "--network", "none",
                                            image, "/bin/true"]),
        ]
        times = round_robin(candidates, iterations, warmup)
    finally:
        if engine is not None:
            engine.stop()
    out = ms_columns({name: summary(times[name])
                      for name in ("corral", "corral_run", "docker_backend", "docker_run")})
    out["ratio_docker_run_vs_corral_p50"] = round(out["docker_run_ms_p50"]
                                                  / out["corral_ms_p50"], 1)
    out["ratio_docker_run_vs_corral_run_p50"] = round(out["docker_run_ms_p50"]
                                                      / out["corral_run_ms_p50"], 1)
    out["ratio_docker_backend_vs_corral_p50"] = round(out["docker_backend_ms_p50"]
                                                      / out["corral_ms_p50"], 1)
    out["iterations"], out["warmup"] = iterations, warmup
    out["engine"] = "private dockerd" if engine is not None else url
    return out


class ImageCandidate(CorralCandidate):
    """CorralCandidate on an image of the store (spec.image): its root is an overlay of the
    image's layers instead of the host's /usr; the layers are unpacked already (warm)."""

    def __init__(self, ref: str) -> None:
        from corral.sandbox import SandboxSpec

        super().__init__()
        self.name = "image"
        self._spec = SandboxSpec(image=ref)


def true_image(directory: str) -> str:
    """A `docker save` tarball of /bin/true, its libraries and the mount points only:
    the same small image for Corral and for `docker run`; returns its REF."""
    import hashlib
    import io
    import tarfile

    from corral.sandbox.backends.docker.image import RootfsPlan, _ldd

    plan = RootfsPlan()
    plan.add_host_path("/bin/true")
    for lib in sorted(_ldd([os.path.realpath("/bin/true")])):
        plan.add_host_path(lib)
    plan.dirs.update({"/etc", "/tmp", "/workspace", "/proc", "/dev", "/sys", "/run"})
    layer = io.BytesIO()
    plan.write_tar(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["corral-bench/true:1"],
                            "Layers": ["layer.tar"]}]).encode()
    path = os.path.join(directory, "true-image.tar")
    with tarfile.open(path, "w") as tar:
        for name, data in (("manifest.json", manifest), ("config.json", config),
                           ("layer.tar", layer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "docker-archive:" + path


def image_columns(iterations: int, warmup: int, url: str | None) -> dict:
    """Native Corral on the host's /usr vs on an image (warm store) vs `docker run --rm` of
    that image, round-robin in this run (a private store; a private dockerd unless url)."""
    from corral.sandbox.backends.docker import client
    from corral.sandbox.backends.docker.images import engine_image
    from corral.sandbox.backends.docker.private_engine import PrivateEngine
    from corral.sandbox.images.store import ImageStore

    cli = shutil.which("docker")
    work = tempfile.mkdtemp(prefix="corral-bench-image.")
    before = os.environ.get("CORRAL_IMAGE_ROOT")
    os.environ["CORRAL_IMAGE_ROOT"] = os.path.join(work, "store")
    engine = None
    try:
        ref = true_image(work)
        ImageStore().pull(ref)
        corral, image = CorralCandidate(), ImageCandidate(ref)
        candidates = [corral, image]
        if cli is not None:
            if url is None:
                engine = PrivateEngine().start()
                url = engine.url
            name, _ = engine_image(client(url), url, ref)
            candidates.append(CommandCandidate("docker_run_image", [
                cli, "-H", url, "run", "--rm", "--network", "none", name, "/bin/true"]))
        times = round_robin(candidates, iterations, warmup)
    finally:
        if engine is not None:
            engine.stop()
        if before is None:
            os.environ.pop("CORRAL_IMAGE_ROOT", None)
        else:
            os.environ["CORRAL_IMAGE_ROOT"] = before
        shutil.rmtree(work, ignore_errors=True)
    out = ms_columns({name: summary(values) for name, values in times.items()})
    out["ratio_image_vs_corral_p50"] = round(out["image_ms_p50"] / out["corral_ms_p50"], 3)
    if "docker_run_image_ms_p50" in out:
        out["ratio_docker_run_image_vs_image_p50"] = round(out["docker_run_image_ms_p50"]
                                                           / out["image_ms_p50"], 1)
    out["image_phases_ms"] = {k: summary(v) for k, v in image.phases.items()}
    out["corral_phases_ms"] = {k: summary(v) for k, v in corral.phases.items()}
    out["iterations"], out["warmup"] = iterations, warmup
    out["targets"] = {"ratio_image_vs_corral_p50": "<= 1.3",
                      "ratio_docker_run_image_vs_image_p50": ">= 20"}
    return out


def add_image_columns(result: dict, args) -> None:
    """result["image"] (image_columns) and its headline keys at the top level."""
    try:
        image = image_columns(args.image_iterations, min(args.warmup, 5), args.docker_host)
    except Exception as exc:  # noqa: BLE001 - the other columns still stand
        image = {"error": str(exc)}
    result["image"] = image
    for key in ("image_ms_p50", "docker_run_image_ms_p50", "ratio_image_vs_corral_p50",
                "ratio_docker_run_image_vs_image_p50"):
        if key in image:
            result[key] = image[key]


def spawn_posix() -> float:
    """/bin/true by os.posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK))."""
    t0 = time.perf_counter()
    pid = os.posix_spawn("/bin/true", ["true"], {})
    os.waitpid(pid, 0)
    return (time.perf_counter() - t0) * 1000


def spawn_fork() -> float:
    """/bin/true by fork + execv: the page tables of this process are copied."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/true", ["true"])
        finally:
            os._exit(127)
    os.waitpid(pid, 0)
    return (time.perf_counter() - t0) * 1000


spawn_posix.name = "spawn_posix"  # type: ignore[attr-defined]
spawn_fork.name = "spawn_fork"  # type: ignore[attr-defined]


def round_robin(candidates: list, iterations: int, warmup: int) -> dict[str, list[float]]:
    """Run every candidate once per iteration, rotating who goes first."""
    for i in range(warmup):
        for c in candidates[i % len(candidates):] + candidates[:i % len(candidates)]:
            c()
    for c in candidates:
        if isinstance(c, CorralCandidate):
            for key in c.phases:
                c.phases[key].clear()
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    gc.collect()
    gc.disable()  # collections happen between iterations, not inside a timed call
    try:
        for i in range(iterations):
            k = i % len(candidates)
            for c in candidates[k:] + candidates[:k]:
                times[c.name].append(c())
            gc.collect(0)
    finally:
        gc.enable()
    return times


def cgroup_pool_columns(bwrap: str, iterations: int, warmup: int) -> dict:
    """run() with the pools `corral daemon` keeps by default, 4 cgroups (sandbox/cgroup_pool.py)
    and 4 (user, network) namespace pairs (sandbox/namespace_pool.py), against bare bwrap,
    alternating, in a pass of its own after the main round (the pools are the process's: the
    main round's run() has none)."""
    from corral.sandbox import cgroup_pool, namespace_pool

    pool = cgroup_pool.enable(4)
    if pool is None:
        return {"cgroup_pool": "none here (no delegated cgroups)"}
    pairs = namespace_pool.enable(4)
    bw = BwrapCandidate(bwrap)
    bw.name = "bwrap_pool_pass"
    try:
        times = round_robin([CorralRunCandidate("corral_run_pooled"),
                             CommandCandidate("bwrap_bare_pool_pass", bwrap_bare_argv(bwrap)),
                             CorralCandidate("corral_pooled"), bw],
                            iterations, warmup)
        hits, misses = pool.hits, pool.misses
        pair_counts = {} if pairs is None else {"namespace_pool_hits": pairs.hits,
                                                "namespace_pool_misses": pairs.misses}
    finally:
        bw.close()
        cgroup_pool.disable()
        namespace_pool.disable()
    run, bare = summary(times["corral_run_pooled"]), summary(times["bwrap_bare_pool_pass"])
    full, flags = summary(times["corral_pooled"]), summary(times["bwrap_pool_pass"])
    return {"corral_run_pooled_ms_p50": run["p50"], "corral_run_pooled_ms_p99": run["p99"],
            "bwrap_bare_pool_pass_ms_p50": bare["p50"],
            "ratio_pooled_vs_bwrap_bare_p50": round(run["p50"] / bare["p50"], 3),
            "ratio_pooled_vs_bwrap_bare_p99": round(run["p99"] / bare["p99"], 3),
            "corral_pooled_ms_p50": full["p50"], "corral_pooled_ms_p99": full["p99"],
            "bwrap_pool_pass_ms_p50": flags["p50"], "bwrap_pool_pass_ms_p99": flags["p99"],
            "ratio_corral_pooled_vs_bwrap_p50": round(full["p50"] / flags["p50"], 3),
            "ratio_corral_pooled_vs_bwrap_p99": round(full["p99"] / flags["p99"], 3),
            "cgroup_pool_hits": hits, "cgroup_pool_misses": misses, **pair_counts}


# -- Corral profile (wrappers around its functions, installed by this script only) ---------


def install_profile() -> dict[str, float]:
    """Wrap Corral's internal steps with timers; returns the accumulator (seconds)."""
    import importlib

    acc: dict[str, float] = {}

    def wrap(owner, attr: str, label: str) -> None:
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if raw is None:
            return
        is_classmethod = isinstance(raw, classmethod)
        func = raw.__func__ if is_classmethod else raw

        @functools.wraps(func)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, attr, classmethod(timed) if is_classmethod else timed)

    native = importlib.import_module("corral.sandbox.backends.native")
    cgroups = importlib.import_module("corral.sandbox.cgroups")
    contain = importlib.import_module("corral.sandbox.contain")
    mounts = importlib.import_module("corral.sandbox.mounts")
    spawn = importlib.import_module("corral.ext._spawn")
    targets = [
        (contain, "prepare", "contain.prepare (seccomp/landlock/rlimits)"),
        (contain, "init_plan", "contain.init_plan (incl. mounts.plan)"),
        (mounts, "plan", "  mounts.plan"),
        (contain, "exec_plan", "contain.exec_plan"),
        (spawn, "open_tree_clone", "_spawn.open_tree_clone (workspace)"),
        (spawn, "spawn_init", "_spawn.spawn_init (clone PID 1 ... execveat corral-init)"),
        (spawn, "spawn_join", "_spawn.spawn_join (helper, setns, clone, ... execve)"),
        (native, "sweep", "native.sweep"),
        (native, "_cgroup_layout", "native._cgroup_layout"),
        (cgroups, "detect", "cgroups.detect"),
        (cgroups.Cgroup, "create", "Cgroup.create (mkdir + limit writes)"),
        (cgroups.Cgroup, "kill", "Cgroup.kill (all calls)"),
        (cgroups.Cgroup, "destroy", "Cgroup.destroy (incl. its kill)"),
        (cgroups, "_rmdir_tree", "  cgroups._rmdir_tree"),
        (native.Sandbox, "_setup_workspace", "Sandbox._setup_workspace (mkdtemp)"),
        (native.Sandbox, "_write_state", "Sandbox._write_state (json)"),
        (native.Sandbox, "_cleanup", "Sandbox._cleanup (all of destroy)"),
        (native.Process, "__init__", "Process.__init__ (pidfd, oom counter)"),
        (native.Process, "wait", "Process.wait"),
        (native.shutil, "rmtree", "shutil.rmtree (workspace, runtime dir)"),
        (native.time, "sleep", "time.sleep (inside corral)"),
    ]
    for owner, attr, label in targets:
        wrap(owner, attr, label)
    return acc


def profile_corral(iterations: int, warmup: int, corral=None) -> dict[str, float]:
    """Per-iteration mean of each wrapped step of corral (default: a CorralCandidate), in
    ms (wrapped calls nest; see labels)."""
    acc = install_profile()
    corral = corral or CorralCandidate()
    for _ in range(warmup):
        corral()
    acc.clear()
    total = 0.0
    for _ in range(iterations):
        total += corral()
    what = "run()" if corral.name == "corral_run" else "create+exec+wait+destroy"
    out = {f"total ({what})": round(total / iterations, 3)}
    for label, seconds in sorted(acc.items(), key=lambda kv: -kv[1]):
        out[label] = round(seconds / iterations * 1000, 3)
    return out


# -- cgroup attach after idle --------------------------------------------------------------


def attach_probe(samples: int, idle_s: float = 0.1) -> dict:
    """Time moving a fresh process into a new cgroup, right after another move vs after idle.

    A write to cgroup.procs takes the kernel's cgroup_threadgroup_rwsem for writing; when
    no move happened for a while its rcu_sync has gone back to the fast (reader) mode and
    the writer waits out an RCU grace period first. Corral pays this once per create (PID 1
    joins the cgroup) and once per exec (the join helper does), so sporadic use sees it,
    a tight loop does not. `favordynmods` on any mounted hierarchy removes the wait.
    """
    from corral.sandbox import cgroups

    layout = cgroups.detect()
    cg = cgroups.Cgroup.create(layout, f"bench-attach-{os.getpid()}", cgroups.CgroupLimits())
    out: dict[str, list[float]] = {"back_to_back": [], "after_idle": []}
    try:
        for i in range(2 * samples):
            key = "after_idle" if i % 2 else "back_to_back"
            pid = os.posix_spawn("/bin/sleep", ["sleep", "30"], {})
            try:
                if key == "after_idle":
                    time.sleep(idle_s)
                else:
                    cg.attach(pid)  # a move just before the timed one
                    pid2, pid = pid, os.posix_spawn("/bin/sleep", ["sleep", "30"], {})
                    os.kill(pid2, 9)
                    os.waitpid(pid2, 0)
                t0 = time.perf_counter()
                cg.attach(pid)
                out[key].append((time.perf_counter() - t0) * 1000)
            finally:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
    finally:
        cg.destroy()
    mounts = open("/proc/self/mounts").read()
    return {
        "attach_back_to_back_ms_p50": round(statistics.median(out["back_to_back"]), 3),
        "attach_after_idle_ms_p50": round(statistics.median(out["after_idle"]), 3),
        "attach_after_idle_ms_max": round(max(out["after_idle"]), 3),
        "idle_s": idle_s,
        "samples": samples,
        "favordynmods": "favordynmods" in mounts,
    }


# -- cold CLI ------------------------------------------------------------------------------


def corral_cli() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "corral")
    found = here if os.access(here, os.X_OK) else shutil.which("corral")
    if not found:
        sys.exit("bench/spawn.py: the corral CLI is not built; run `make build` first")
    return found


class CliCandidate(CommandCandidate):
    """A cold CLI run, optionally with bytecode caching forced on (into a temp prefix)."""

    def __init__(self, name: str, argv: list[str], pycache_prefix: str | None = None) -> None:
        super().__init__(name, argv)
        self.env = None
        if pycache_prefix:
            self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            self.env["PYTHONPYCACHEPREFIX"] = pycache_prefix

    def __call__(self) -> float:
        t0 = time.perf_counter()
        code = subprocess.run(self.argv, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL,
                              env=self.env).returncode
        dt = (time.perf_counter() - t0) * 1000
        if code != 0:
            raise RuntimeError(f"{self.name}: {' '.join(self.argv)} exited {code}")
        return dt


def cold_cli(iterations: int) -> dict[str, list[float]]:
    """`corral run -- /bin/true` as the environment has it, with bytecode, and bare Python.

    With PYTHONDONTWRITEBYTECODE set (as in some CI images) no .pyc is ever written, so
    every cold start compiles Corral's sources again; `cli_pyc` shows the CLI once .pyc
    files exist (written under a temporary PYTHONPYCACHEPREFIX, not into the tree).
    """
    argv = [corral_cli(), "run", "--", "/bin/true"]
    with tempfile.TemporaryDirectory(prefix="corral-bench-pyc-") as prefix:
        candidates = [
            CliCandidate("cli", argv),
            CliCandidate("cli_pyc", argv, pycache_prefix=prefix),
            CliCandidate("python_startup", [sys.executable, "-c", "pass"]),
        ]
        return round_robin(candidates, iterations, warmup=2)


def import_times(top: int = 12) -> dict[str, list]:
    """Heaviest imports of `corral run -- /bin/true` by -X importtime (one run, in ms)."""
    code = "import sys; from corral.runtime.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, "run", "--",
                           "/bin/true"], stdin=DEVNULL, stdout=DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((m.group(4), int(m.group(1)), int(m.group(2)), len(m.group(3))))
    top_level = [r for r in rows if r[3] == 1]
    total_us = sum(r[2] for r in top_level)
    return {
        "total_ms": round(total_us / 1000, 3),
        "by_cumulative_ms": [[n, round(c / 1000, 3)] for n, _s, c, _d in
                             sorted(top_level, key=lambda r: -r[2])[:top]],
        "by_self_ms": [[n, round(s / 1000, 3)] for n, s, _c, _d in
                       sorted(rows, key=lambda r: -r[1])[:top]],
    }


# -- machine -------------------------------------------------------------------------------


def version_of(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def machine_info(bwrap: str, unshare: str) -> dict:
    from corral.sandbox import cgroups

    try:
        cgroup = f"v{cgroups.detect().version}"
    except Exception as exc:  # noqa: BLE001 - informational only
        cgroup = f"unknown ({exc})"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
        commit = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        commit = None
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uid": os.getuid(),
        "cgroup": cgroup,
        "bwrap": version_of([bwrap, "--version"]),
        "unshare": version_of([unshare, "--version"]),
        "commit": commit,
    }


# -- main ----------------------------------------------------------------------------------


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        print(f"bench/spawn.py: {tool} not found; install it with: apt-get install {package}",
              file=sys.stderr)
        sys.exit(2)
    return path


#: The rounds of each part of the run.
SIZES = {
    "iterations": harness.Size(200, 15, "timed rounds; each runs every candidate once"),
    "warmup": harness.Size(20, 3, "untimed rounds first"),
    "cli_iterations": harness.Size(30, 5, "cold `corral run -- /bin/true` runs"),
    "docker_iterations": harness.Size(
        20, 3, "rounds of native vs docker backend vs `docker run --rm`"),
    "rootless_iterations": harness.Size(60, 15, "rounds of rootless Corral vs rootless bwrap"),
    "image_iterations": harness.Size(
        60, 10, "rounds of Corral on the host's /usr vs on an image vs `docker run` of it"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_sizes(parser, SIZES)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", action="store_true",
                        help="also time Corral's internal steps (separate run, wrapped calls)")
    parser.add_argument("--no-cli", action="store_true", help="skip the cold CLI runs")
    parser.add_argument("--docker-host", metavar="URL",
                        help="engine for the docker columns (default: start a private dockerd)")
    parser.add_argument("--no-docker", action="store_true", help="skip the docker columns")
    parser.add_argument("--no-image", action="store_true",
                        help="skip the image columns (image_ms_p50, docker_run_image_ms_p50)")
    parser.add_argument("--rootless-user", metavar="NAME",
                        help="ordinary user for the rootless columns (default: a temporary "
                             "one, made with useradd and removed)")
    parser.add_argument("--no-rootless", action="store_true", help="skip the rootless columns")
    parser.add_argument("--rootless-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pools", action="store_true",
                        help="also time Create through a daemon: a warm-pool hit against a "
                             "cold create (bench/pools.py: pool_create_ms_p50, "
                             "cold_create_ms_p50)")
    args = parser.parse_args(argv)
    if args.rootless_worker:  # we are the unprivileged user: time, print, done
        print(json.dumps(rootless_worker(args.iterations, args.warmup,
                                         require("bwrap", "bubblewrap"))))
        return 0
    harness.apply_quick(args, SIZES)
    if args.iterations < 1 or args.warmup < 0 or args.cli_iterations < 1:
        parser.error("--iterations and --cli-iterations must be at least 1, --warmup at least 0")

    try:
        import corral.ext._spawn  # noqa: F401 - the compiled part must be built
        import corral.sandbox  # noqa: F401
    except ImportError as exc:
        print(f"bench/spawn.py: Corral is not built ({exc}); run `make build` first",
              file=sys.stderr)
        return 2
    bwrap = require("bwrap", "bubblewrap")
    unshare = require("unshare", "util-linux")

    load_start = os.getloadavg()[0]
    corral = CorralCandidate()
    bw = BwrapCandidate(bwrap)
    candidates = [
        corral,
        corral_run := CorralRunCandidate(),
        bw,
        CommandCandidate("unshare", [unshare, "--user", "--map-root-user", "--pid", "--fork",
                                     "--mount", "--net", "--uts", "--ipc", "/bin/true"]),
        CommandCandidate("bwrap_bare", bwrap_bare_argv(bwrap)),
        spawn_posix,
        spawn_fork,
    ]
    try:
        times = round_robin(candidates, args.iterations, args.warmup)
    finally:
        bw.close()

    result: dict = ms_columns({name: summary(times[name]) for name in
                               ("corral", "corral_run", "bwrap", "unshare", "bwrap_bare",
                                "spawn_posix", "spawn_fork")})
    result.update(ratio_columns(result))
    settled = summary(corral_run.settled[-args.iterations:])  # the timed rounds' own
    result["corral_run_settled_ms_p50"] = settled["p50"]
    result["corral_run_settled_ms_p99"] = settled["p99"]
    result["corral_phases_ms"] = {k: summary(v) for k, v in corral.phases.items()}
    if os.geteuid() == 0:  # the cgroups are made by root
        result.update(cgroup_pool_columns(bwrap, args.iterations, args.warmup))
    result["iterations"] = args.iterations
    result["warmup"] = args.warmup
    if not args.no_cli:
        cli = cold_cli(args.cli_iterations)
        result["cli_ms_p50"] = round(statistics.median(cli["cli"]), 3)
        result["cli_ms_p99"] = round(percentile(cli["cli"], 99), 3)
        result["cli_pyc_ms_p50"] = round(statistics.median(cli["cli_pyc"]), 3)
        result["python_startup_ms_p50"] = round(statistics.median(cli["python_startup"]), 3)
        result["pythondontwritebytecode"] = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
        result["cli_iterations"] = args.cli_iterations
        result["cli_imports"] = import_times()
    try:
        result["cgroup_attach"] = attach_probe(3 if args.quick else 8)
    except Exception as exc:  # noqa: BLE001 - a probe, not the benchmark
        result["cgroup_attach"] = {"error": str(exc)}
    if not args.no_docker:
        try:
            docker = docker_columns(args.docker_iterations, min(args.warmup, 3),
                                    args.docker_host)
        except Exception as exc:  # noqa: BLE001 - no engine: the other columns still stand
            docker = {"error": str(exc)}
        result["docker"] = docker
        for key in ("docker_backend_ms_p50", "docker_run_ms_p50",
                    "ratio_docker_run_vs_corral_run_p50"):
            if key in docker:
                result[key] = docker[key]
    if not args.no_image and os.geteuid() == 0:  # an image's layers are idmapped: root
        add_image_columns(result, args)
    if not args.no_rootless and os.geteuid() == 0:
        try:
            rootless = rootless_columns(args.rootless_iterations, min(args.warmup, 5),
                                        args.rootless_user)
        except Exception as exc:  # noqa: BLE001 - the root columns still stand
            rootless = {"error": str(exc)}
        result["rootless"] = rootless
        for key in ("rootless_ms_p50", "rootless_single_ms_p50", "bwrap_rootless_ms_p50"):
            if key in rootless:
                result[key] = rootless[key]
    if args.pools and os.geteuid() == 0:  # the daemon makes sandboxes: root
        import pools

        try:
            result.update(pools.pool_columns(min(args.iterations, 50), min(args.warmup, 3)))
        except Exception as exc:  # noqa: BLE001 - the spawn columns still stand
            result["pools"] = {"error": str(exc)}
    if args.profile:
        result["corral_profile_ms_per_iter"] = profile_corral(args.iterations, args.warmup)
        result["corral_run_profile_ms_per_iter"] = profile_corral(
            args.iterations, args.warmup, CorralRunCandidate())
    result["machine"] = machine_info(bwrap, unshare)
    result["machine"]["loadavg_start"] = load_start
    result["machine"]["loadavg_end"] = os.getloadavg()[0]
    result["bwrap_argv"] = [a if not a.startswith("/tmp/corral-bench") else "{workspace}"
                            for a in bw.argv]
    result["notes"] = {
        "method": "one warm Python process; per round every candidate runs once, the first "
                  "one rotating; GC runs between rounds, not inside a timed call; bwrap and "
                  "unshare start through subprocess.run (vfork+exec), as a Python runtime "
                  "would start them; spawn_posix/spawn_fork are /bin/true with no sandbox",
        "bwrap_lacks": BWRAP_GAPS,
        "unshare_lacks": UNSHARE_GAPS,
    }

    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def _print_columns(r: dict, name: str, measured: str, line) -> None:
    """The line of the optional columns r[name]: line(columns) when `measured` is among
    them, else why they were skipped (nothing when they were not asked for)."""
    columns = r.get(name, {})
    if measured in columns:
        print(line(columns))
    elif "error" in columns:
        print(f"{name} columns skipped: {columns['error']}")


def print_table(r: dict) -> None:
    m = r["machine"]
    print(f"spawn of /bin/true, {r['iterations']} rounds ({r['warmup']} warm-up), "
          f"kernel {m['kernel']}, {m['nproc']} CPUs, cgroup {m['cgroup']}, {m['bwrap']}, "
          f"load {m['loadavg_start']:.2f} -> {m['loadavg_end']:.2f}, commit {m['commit']}")
    print(f"{'candidate':<14}{'p50 ms':>9}{'p99 ms':>9}{'mean':>9}{'min':>9}{'max':>9}")
    for name in ("corral", "corral_run", "bwrap", "bwrap_bare", "unshare", "spawn_posix",
                 "spawn_fork"):
        print(f"{name:<14}" + "".join(f"{r[f'{name}_ms_{k}']:>9.3f}"
                                      for k in ("p50", "p99", "mean", "min", "max")))
    print(f"corral / bwrap: p50 x{r['ratio_corral_vs_bwrap_p50']}, "
          f"p99 x{r['ratio_corral_vs_bwrap_p99']}; corral_run / bwrap_bare: p50 "
          f"x{r['ratio_default_vs_bwrap_bare_p50']}, p99 x{r['ratio_default_vs_bwrap_bare_p99']}")
    print("corral phases:  " + ", ".join(f"{k} {v['p50']:.3f}"
                                         for k, v in r["corral_phases_ms"].items()) + " (p50 ms)")
    if "cli_ms_p50" in r:
        print(f"cold CLI `corral run -- /bin/true`: p50 {r['cli_ms_p50']:.3f} ms "
              f"(p99 {r['cli_ms_p99']:.3f}), with .pyc {r['cli_pyc_ms_p50']:.3f}, bare "
              f"`python -c pass` {r['python_startup_ms_p50']:.3f} ms, over {r['cli_iterations']}"
              f" runs" + (" (PYTHONDONTWRITEBYTECODE is set)" if r["pythondontwritebytecode"]
                          else ""))
        imp = r["cli_imports"]
        print(f"  imports {imp['total_ms']:.1f} ms; heaviest: " + ", ".join(
            f"{n} {ms:.1f}" for n, ms in imp["by_cumulative_ms"][:6]))
    _print_columns(r, "docker", "docker_run_ms_p50", lambda d: (
        f"docker ({d['iterations']} rounds, {d['engine']}): corral {d['corral_ms_p50']:.3f}, "
        f"corral_run {d['corral_run_ms_p50']:.3f}, "
        f"docker backend {d['docker_backend_ms_p50']:.3f}, `docker run --rm` "
        f"{d['docker_run_ms_p50']:.3f} ms p50; docker run / corral "
        f"x{d['ratio_docker_run_vs_corral_p50']}, / corral_run "
        f"x{d['ratio_docker_run_vs_corral_run_p50']}"))
    _print_columns(r, "image", "image_ms_p50", lambda im: (
        f"image ({im['iterations']} rounds): corral {im['corral_ms_p50']:.3f}, on an image "
        f"{im['image_ms_p50']:.3f} ms p50 (x{im['ratio_image_vs_corral_p50']}), `docker "
        f"run --rm` of it {im.get('docker_run_image_ms_p50', float('nan')):.3f} ms "
        f"(x{im.get('ratio_docker_run_image_vs_image_p50')} the image's)"))
    a = r.get("cgroup_attach", {})
    if "attach_after_idle_ms_p50" in a:
        print(f"cgroup attach (cgroup.procs write): {a['attach_back_to_back_ms_p50']:.3f} ms right "
              f"after another move, {a['attach_after_idle_ms_p50']:.3f} ms after {a['idle_s']} s "
              f"idle (max {a['attach_after_idle_ms_max']:.3f}); favordynmods: {a['favordynmods']}")
    for key in ("corral_profile_ms_per_iter", "corral_run_profile_ms_per_iter"):
        if key in r:
            print(f"{key.split('_profile')[0]} profile (ms per iteration; wrapped calls nest):")
            for label, ms in r[key].items():
                print(f"  {ms:8.3f}  {label}")
    print("bwrap lacks: " + "; ".join(g.split(":")[0] for g in r["notes"]["bwrap_lacks"]))


if __name__ == "__main__":
    sys.exit(main())
