"""Rootless tests: the CLI run by an unprivileged user these fixtures create (and remove).

The build's venv uses a pyenv Python under /root (mode 0700), which such a user cannot
run. The user gets a venv made from /usr/bin/python3 instead, without pip, whose two .pth
files point at the build venv's site-packages (readable: the dependencies, grpc included)
and install Corral's editable finder (the sources and Cython extensions under the
checkout). The extensions are built for CPython 3.11's ABI: /usr/bin/python3 must be a
3.11 too, which the fixture checks and says how to fix when it is not. The venv is kept
under /var/cache/corral-tests, keyed by both interpreters and the finder, so later runs
reuse it.

Users: `rootless_user` is made with `useradd -m` (Debian gives it subordinate ids, so its
sandboxes map through newuidmap/newgidmap); `single_id_user` has its subordinate ranges
removed (a single-id map). Both are removed at the end with their home, processes and
Corral's per-user directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import corral.sandbox

from ..egress.conftest import internet  # noqa: F401 (the egress tests' servers, a fixture)

SYSTEM_PYTHON = "/usr/bin/python3"
CACHE = Path("/var/cache/corral-tests")
REPO = Path(corral.sandbox.__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Making users needs root; without it, skip rather than fail."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="tests/rootless create users (root needed to set up)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)


def _system_python_version() -> str:
    return subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def user_python() -> str:
    """A python every user can run that imports this checkout's corral (cached venv)."""
    version = _system_python_version()
    if not version.startswith(f"{sys.version_info.major}.{sys.version_info.minor}."):
        pytest.fail(f"{SYSTEM_PYTHON} is {version.split()[0]}, but the extensions are built "
                    f"for {sys.version_info.major}.{sys.version_info.minor}: install "
                    f"python{sys.version_info.major}.{sys.version_info.minor} as "
                    f"{SYSTEM_PYTHON} for the rootless tests")
    site = sysconfig.get_paths()["purelib"]
    finder = next(Path(site).glob("__editable___corral_*_finder.py"))
    key = hashlib.sha256("\0".join([version, sys.version, site, finder.read_text()])
                         .encode()).hexdigest()[:16]
    venv = CACHE / f"rootless-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        tmp = CACHE / f".rootless-venv-{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(tmp)], check=True)
        own_site = next((tmp / "lib").glob("python3*/site-packages"))
        (own_site / "00-corral-deps.pth").write_text(site + "\n")
        (own_site / "zz-corral.pth").write_text(
            f"import {finder.stem}; {finder.stem}.install()\n")
        (tmp / ".ready").write_text(version + "\n")
        try:
            os.rename(tmp, venv)
        except OSError:  # another session made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return str(python)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path


def _make_user(prefix: str) -> User:
    name = prefix + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o755)
    return User(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


def _remove_user(user: User) -> None:
    # anything of theirs still running (a failed test's sandbox) goes first
    for _ in range(50):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(int(p)) == user.uid]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    subprocess.run(["userdel", "--remove", user.name], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for path in (f"/tmp/corral-{user.uid}",):
        shutil.rmtree(path, ignore_errors=True)


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@pytest.fixture(scope="session")
def rootless_user():
    """An ordinary user with subordinate ids (useradd's default on Debian)."""
    user = _make_user("crl")
    try:
        yield user
    finally:
        _remove_user(user)


@pytest.fixture(scope="session")
def single_id_user():
    """An ordinary user with no line in /etc/subuid or /etc/subgid."""
    user = _make_user("crs")
    try:
        for path in ("/etc/subuid", "/etc/subgid"):
            for line in Path(path).read_text().splitlines():
                name, start, count = line.split(":")
                if name == user.name:
                    flag = "--del-subuids" if path.endswith("uid") else "--del-subgids"
                    last = int(start) + int(count) - 1
                    subprocess.run(["usermod", flag, f"{start}-{last}", user.name], check=True)
        yield user
    finally:
        _remove_user(user)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_as(user: User, python: str, *args: str, env: dict | None = None,
           cwd: Path | None = None, timeout: float = 300) -> Result:
    """`corral ARGS` as user, in their home, with a login-like environment."""
    base = {"HOME": str(user.home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
            "USER": user.name, "LOGNAME": user.name}
    proc = subprocess.run([python, "-m", "corral.runtime.cli", *args], user=user.uid,
                          group=user.gid, extra_groups=[], env={**base, **(env or {})},
                          cwd=str(cwd or user.home), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def as_user_do(user: User, python: str, code: str) -> str:
    """Run Python code as user (to make files they own); returns its stdout."""
    proc = subprocess.run([python, "-c", code], user=user.uid, group=user.gid,
                          extra_groups=[], env={"HOME": str(user.home)},
                          cwd=str(user.home), capture_output=True, text=True, check=True)
    return proc.stdout


def subid_range(user: User, path: str) -> tuple[int, int] | None:
    for line in Path(path).read_text().splitlines():
        name, start, count = line.split(":")
        if name == user.name:
            return int(start), int(count)
    return None

