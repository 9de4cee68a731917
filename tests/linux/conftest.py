"""Shared helpers of the real-kernel tests: the in-sandbox probe runner and the leak check.

Every test in tests/linux runs under `no_leftovers`: when it ends, no sandbox runtime
directory, corral cgroup, temporary workspace or process in such a cgroup that the test
made may remain. Sandboxes another process made (a colleague's run on the same machine)
are told apart by their creator -- state.json's, or the parent of the cgroup's PID 1 --
and left alone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import corral.sandbox.probes
from corral.runtime.tasks import shim_cgroup
from corral.sandbox import BindMount, Sandbox, SandboxSpec, cgroup_pool, cgroups, run
from corral.sandbox.backends.native import runtime_base
from corral.sandbox.procinfo import named_owner
from corral.sandbox.undertaker import undertaker

from ..processes import alive, cgroup_dirs, wait_until  # noqa: F401 (for the tests)

#: sandbox/probes: the probe program inside.py (the conformance suite's own, which passes its
#: source with -c instead), bound read-only at /probes in every probe sandbox.
PROBES_DIR = Path(corral.sandbox.probes.__file__).resolve().parent
PROBES_MOUNT = BindMount(str(PROBES_DIR), "/probes", writable=False)
INSIDE = ["python3", "-I", "/probes/inside.py"]

MiB = 1 << 20


def pytest_collection_modifyitems(config, items):
    """Everything here needs root on a real kernel; without it, skip rather than fail."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="tests/linux need root (namespaces, cgroups, seccomp)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)


# -- probes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What one inside.py run reported, and how its process ended."""

    ok: bool | None  # None: the probe printed nothing (it was killed)
    errno: str | None
    value: object
    returncode: int
    reason: str
    stderr: str

    @property
    def outcome(self):
        """One comparable value: 'ok', the errno name, or 'signal N'."""
        if self.ok is None:
            if self.returncode < 0:
                return f"signal {-self.returncode}"
            return f"exit {self.returncode}"
        return "ok" if self.ok else self.errno


def probe_spec(**fields) -> SandboxSpec:
    """A default-policy spec with the probes bound at /probes (extra binds appended)."""
    binds = (PROBES_MOUNT, *fields.pop("binds", ()))
    fields.setdefault("timeout_s", 60)
    fields.setdefault("memory_bytes", 256 * MiB)
    return SandboxSpec(binds=binds, **fields)


def parse_probe(stdout: bytes, stderr: bytes, returncode: int, reason) -> Probe:
    lines = stdout.decode(errors="replace").strip().splitlines()
    reason_text = getattr(reason, "value", str(reason))
    if not lines:
        return Probe(None, None, None, returncode, reason_text, stderr.decode(errors="replace"))
    doc = json.loads(lines[-1])
    return Probe(doc["ok"], doc["errno"], doc["value"], returncode, reason_text,
                 stderr.decode(errors="replace"))


def inside(*args: str, spec: SandboxSpec | None = None, sandbox: Sandbox | None = None,
           **exec_kw) -> Probe:
    """Run inside.py OP ARGS in a fresh default sandbox (or in `sandbox`)."""
    argv = [*INSIDE, *args]
    if sandbox is not None:
        proc = sandbox.exec(argv, **exec_kw)
        out, err = proc.communicate()
        return parse_probe(out, err, proc.returncode, proc.reason)
    result = run(argv, spec or probe_spec())
    return parse_probe(result.stdout, result.stderr, result.returncode, result.reason)


# -- process helpers -------------------------------------------------------------------------






def command_names(sandbox) -> list[str]:
    """Sorted names of a sandbox's processes but PID 1, as the host sees them."""
    names = []
    for pid in sandbox.pids():
        if pid == sandbox.init_pid:
            continue
        try:
            names.append(host_status(pid)["Name"])
        except (FileNotFoundError, ProcessLookupError):
            pass  # it ended while we looked
    return sorted(names)


def host_status(pid: int) -> dict[str, str]:
    """Selected lines of /proc/PID/status as the host sees them."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = " ".join(value.split())
    return out


# -- the leak check --------------------------------------------------------------------------


#: A temporary workspace: tempfile.mkdtemp(prefix=f"corral-{id}-") adds 8 random characters.
# A native sandbox's temporary workspace: corral-<id>-<mkdtemp suffix>, ids being sbx-<hex>
# (other tools' temporary folders, corral-dockerd-*, corral-ray-*, ..., are not ours).
_WORKSPACE_RE = re.compile(r"^corral-sbx-[0-9a-f]+-[A-Za-z0-9_]{8}$")


@dataclass(frozen=True)
class Footprint:
    runtime: frozenset[str]
    #: corral/'s cgroups by name, the batch group's as "corral-batch/<name>"
    cgroups: frozenset[str]
    workspaces: frozenset[str]


def _cgroup_entries(layout) -> frozenset[str]:
    return frozenset(cgroups.list_corral_cgroups(layout)) | frozenset(
        f"{cgroups.BATCH_DIR}/{name}"
        for name in cgroups.list_corral_cgroups(layout.in_group(cgroups.BATCH_DIR)))


def _cgroup(layout, entry: str) -> cgroups.Cgroup:
    """The cgroup a Footprint entry names."""
    group, _, name = entry.rpartition("/")
    return cgroups.Cgroup(layout.in_group(group or cgroups.CORRAL_DIR), name)


@pytest.fixture(scope="session")
def cgroup_layout():
    return cgroups.detect()


def _footprint(layout) -> Footprint:
    base = runtime_base()
    try:
        runtime = frozenset(os.listdir(base))
    except FileNotFoundError:
        runtime = frozenset()
    return Footprint(
        runtime=runtime,
        cgroups=_cgroup_entries(layout),
        workspaces=frozenset(p for p in glob.glob(os.path.join("/tmp", "corral-*"))
                             if _WORKSPACE_RE.match(os.path.basename(p)) and os.path.isdir(p)),
    )


def _creator(sandbox_id: str) -> int | None:
    try:
        with open(os.path.join(runtime_base(), sandbox_id, "state.json")) as f:
            return int(json.load(f)["creator"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cgroup_owner(layout, name: str) -> int | None:
    """The parent of the cgroup's PID 1: the process that created the sandbox (PID 1 is
    cloned as its child). Seen this way, a sandbox kept under another runtime directory
    (a daemon's) is still recognised."""
    members = {pid for group in cgroups.GROUPS
               for pid in cgroups.Cgroup(layout.in_group(group), name).pids()}
    for pid in members:
        with contextlib.suppress(OSError, KeyError, ValueError):
            parent = int(host_status(pid)["PPid"])
            if parent not in members:
                return parent
    return None


def _named_owner(name: str) -> int | None:
    """The live process whose pool, shims' or relays' cgroup this is by its name
    (sandbox/cgroup_pool.py, runtime/tasks/shim_cgroup.py), or None."""
    for prefix in (cgroup_pool.PREFIX, shim_cgroup.PREFIX, shim_cgroup.RELAY_PREFIX):
        owner = named_owner(name, prefix)
        if owner is not None and owner[1]:
            return owner[0]
    return None


def _owner(layout, sandbox_id: str) -> int | None:
    """Who made a new cgroup or sandbox: another process's (a daemon of a suite running
    beside this one) is left alone, never removed as this test's leftover."""
    return (_named_owner(sandbox_id) or _creator(sandbox_id)
            or _cgroup_owner(layout, sandbox_id))


def _foreign(layout, sandbox_id: str, ours: set[int]) -> bool:
    """A sandbox that neither this process nor a child it started (the CLI, a crashing
    caller) created: another process's (a colleague's run of the same suite), not ours to
    judge. A sandbox whose owner cannot be told is counted as ours."""
    owner = _owner(layout, sandbox_id)
    return owner is not None and owner not in ours


def _workspace_id(path: str) -> str:
    return os.path.basename(path)[len("corral-"):-9]  # corral-<id>-<8 random characters>


def _leftovers(before: Footprint, layout, ours: set[int]) -> dict[str, list[str]]:
    after = _footprint(layout)
    new_runtime = after.runtime - before.runtime
    new_cgroups = after.cgroups - before.cgroups
    new_workspaces = after.workspaces - before.workspaces
    ids = (new_runtime | {_cgroup(layout, c).name for c in new_cgroups}
           | {_workspace_id(w) for w in new_workspaces})
    # A sandbox with no known owner yet may be another process's, half created or half
    # destroyed: give it a moment to show its owner (or to finish disappearing).
    if any(_owner(layout, i) is None for i in ids):
        time.sleep(0.5)
    foreign = {i for i in ids if _foreign(layout, i, ours)}
    runtime = sorted(i for i in new_runtime
                     if i not in foreign and os.path.isdir(os.path.join(runtime_base(), i)))
    cgs = sorted(c for c in new_cgroups
                 if _cgroup(layout, c).name not in foreign and _cgroup(layout, c).exists())
    workspaces = sorted(w for w in new_workspaces
                        if _workspace_id(w) not in foreign and os.path.exists(w))
    processes = []
    for name in cgs:
        for pid in _cgroup(layout, name).pids():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                processes.append(f"{name}: {pid} {cmdline}")
    found = {"runtime dirs": runtime, "cgroups": cgs, "workspaces": workspaces,
             "processes": processes}
    return {k: v for k, v in found.items() if v}


def _remove(found: dict[str, list[str]], layout) -> None:
    """Clean what a failed test leaked so that the next test starts from a clean host."""
    # A command is this process's child (CLONE_PARENT); while its zombie waits here, the
    # sandbox's PID 1 cannot finish dying (the kernel waits for every task of the PID
    # namespace to be reaped). Reap whatever children a failed test left.
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
    for name in found.get("cgroups", []):
        with contextlib.suppress(Exception):
            _cgroup(layout, name).destroy()
    for name in found.get("runtime dirs", []):
        shutil.rmtree(os.path.join(runtime_base(), name), ignore_errors=True)
    for path in found.get("workspaces", []):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftovers(request, cgroup_layout, monkeypatch):
    """After each test: nothing the test's sandboxes used may remain on the host."""
    if os.geteuid() != 0:
        yield
        return
    ours = {os.getpid()}
    popen_init = subprocess.Popen.__init__

    def recording_init(self, *args, **kwargs):
        popen_init(self, *args, **kwargs)
        ours.add(self.pid)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    before = _footprint(cgroup_layout)
    yield
    undertaker.flush()  # what run() left for the background thread to remove
    found = _leftovers(before, cgroup_layout, ours)
    if found:
        _remove(found, cgroup_layout)
        pytest.fail(f"{request.node.nodeid} left sandbox state behind: {found}", pytrace=False)
