"""A real `corral daemon` in a subprocess, and recorders for what its streams deliver.

`DaemonProcess` starts the daemon on its own socket and state directory, waits for the
standard health check to say SERVING, and on stop checks that nothing the daemon made
outlives it: every sandbox it created (read back from its own audit log) has no runtime
directory, cgroup, temporary workspace or live process left.

`SessionRecorder` drains a Sessions.Open stream on a thread and keeps every token with its
seq, every turn event and the exit, so a test can wait for a state and compare sequences.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.runtime.audit import AuditLog
from corral.runtime.client import Client, ClientError, SessionStream
from corral.sandbox import workspace_fs
from corral.sandbox.backends.native import runtime_base
from corral.v1 import stream_pb2

from ..processes import alive, cgroup_dirs, wait_until  # noqa: F401 (for the tests)

AGENTS_DIR = Path(__file__).resolve().parent / "agents"
#: Where `upload_agents` puts the test agents inside a sandbox.
STREAM_AGENT = "/workspace/stream_agent.py"
PLAIN_AGENT = "/workspace/plain_agent.py"
EVENT_TOKEN = stream_pb2.EVENT_KIND_TOKEN
_SUN_PATH_MAX = 107  # bytes of a unix socket path, NUL excluded








def sandbox_footprint(sandbox_id: str) -> dict[str, list[str]]:
    """What of a sandbox is still on the host: runtime dir, cgroups, temporary workspace."""
    found = {
        "runtime dir": [p for p in [os.path.join(runtime_base(), sandbox_id)]
                        if os.path.exists(p)],
        "cgroups": cgroup_dirs(sandbox_id),
        "workspace": [p for p in [os.path.join(workspace_fs.root(), sandbox_id)]
                      if os.path.exists(p)] + glob.glob(f"/tmp/corral-{sandbox_id}-*"),
    }
    return {k: v for k, v in found.items() if v}


def upload_agents(client: Client, sandbox_id: str) -> None:
    for name in ("stream_agent.py", "plain_agent.py"):
        client.write_file(sandbox_id, name, (AGENTS_DIR / name).read_bytes())


# -- the daemon ------------------------------------------------------------------------------


class DaemonProcess:
    """One `corral daemon` subprocess with its own socket and state directory."""

    def __init__(self, root: Path, *, args: tuple[str, ...] = (), config: str | None = None):
        self.root = Path(root)
        self.state = self.root / "state"
        self.socket = str(self.root / "corral.sock")
        if len(os.fsencode(self.socket)) > _SUN_PATH_MAX:
            import tempfile

            self.socket = os.path.join(tempfile.mkdtemp(prefix="cit-"), "corral.sock")
        self.args = tuple(args)
        self.config_path = None
        if config is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.config_path = self.root / "corral.toml"
            self.config_path.write_text(config)
            os.chmod(self.config_path, 0o600)
        self.log_path = self.root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self._clients: list[Client] = []
        self._log = None

    @property
    def audit_db(self) -> str:
        return str(self.state / "audit.db")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "corral.runtime.cli", "daemon",
               "--socket", self.socket, "--state", str(self.state), *self.args]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def start(self, timeout_s: float = 20.0, status: str = "SERVING") -> DaemonProcess:
        """Start and wait until the health check says `status` (NOT_SERVING: a daemon that
        came up but refuses work, e.g. on a full disk)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode} while "
                                   f"starting:\n{self.log()}")
            if os.path.exists(self.socket) and self.health() == status:
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the daemon did not become {status} in {timeout_s}s:\n{self.log()}")

    def run_to_exit(self, timeout_s: float = 20.0) -> int:
        """Start the daemon expecting it to refuse; returns its exit status."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            done = subprocess.run(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        return done.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name, or UNAVAILABLE when nothing answers."""
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            except grpc.RpcError as exc:
                return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def client(self, tenant: str | None = None) -> Client:
        c = Client.connect(socket=self.socket, tenant=tenant)
        self._clients.append(c)
        return c

    def _close_clients(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"the daemon ignored SIGTERM for {timeout_s}s:\n{self.log()}") from None
        finally:
            self._close_log()
        self._close_clients()  # after: open streams see how the daemon ended them
        return rc

    def ensure_stopped(self) -> None:
        """Stop whatever is still running (after a failed test): SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return
        try:
            self.stop(timeout_s=20)
        except AssertionError:
            pass  # stop() already killed it

    def kill(self) -> int:
        """SIGKILL, as a crash would; returns the wait status (-9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait(30)
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- what the daemon recorded, read straight from its audit log ---------------------------

    def verify(self):
        """Verify the audit chain on disk (works with the daemon stopped)."""
        log = AuditLog.open(self.audit_db, readonly=True)
        try:
            return log.verify()
        finally:
            log.close()

    def records(self, kind: str | None = None) -> list:
        log = AuditLog.open(self.audit_db, readonly=True)
        try:
            return log.query(kind=kind, limit=10_000)
        finally:
            log.close()

    def created(self) -> dict[str, list[int]]:
        """Every sandbox this daemon created -> host pids it knew there (PID 1, commands)."""
        pids: dict[str, list[int]] = {}
        for rec in self.records():
            detail = json.loads(rec.detail_json or "{}")
            if rec.kind == "sandbox.create":
                pids.setdefault(rec.sandbox_id, []).append(detail.get("init_pid") or 0)
            elif rec.kind in ("exec.exit", "exec.oom", "exec.timeout"):  # exec.start is
                # written before the spawn, so the pid is in the exit record
                pids.setdefault(rec.sandbox_id, []).append(detail.get("pid") or 0)
        return pids

    def leftovers(self) -> dict[str, dict]:
        """Anything a created sandbox left on the host: dirs, cgroups, live processes."""
        found = {}
        for sandbox_id, pids in self.created().items():
            left = sandbox_footprint(sandbox_id)
            live = [p for p in pids if p and alive(p)
                    and (_in_sandbox(p, sandbox_id, self._pool) or _comm(p) == "corral-init")]
            if live:
                left["live processes"] = live
            if left:
                found[sandbox_id] = left
        # the cgroups its pool held or lent (sandbox/cgroup_pool.py): its stop removes them
        # (while it runs, ready ones are its own, not left behind)
        if self.proc is not None and self.proc.poll() is not None:
            pooled = sorted(set(glob.glob(f"/sys/fs/cgroup/*/corral/{self._pool}*")
                                + glob.glob(f"/sys/fs/cgroup/corral/{self._pool}*")))
            if pooled:
                found["(cgroup pool)"] = {"cgroups": pooled}
            # the id ranges of its ready namespace pairs (sandbox/namespace_pool.py): a
            # clean stop gives them back (a killed daemon's wait for the next sweep)
            if self.proc.returncode == 0 and self.pool_id_slots():
                found["(namespace pool)"] = {"id slots": self.pool_id_slots()}
        return found

    def pool_id_slots(self) -> list[str]:
        """Id slot files that this daemon's namespace pool holds."""
        from corral.sandbox import ids, namespace_pool

        held = []
        for path in glob.glob(os.path.join(ids.state_dir(), "*")):
            try:
                with open(path) as f:
                    record = json.loads(f.readline())
            except (OSError, ValueError):
                continue
            if (record.get("pid") == self.pid
                    and record.get("sandbox") == namespace_pool.POOL_OWNER):
                held.append(path)
        return sorted(held)

    @property
    def _pool(self) -> str:
        """The name prefix of the cgroups of this daemon's cgroup pool."""
        return f"pool.{self.pid}."


def sandbox_cgroup(sandbox_id: str) -> str:
    """The name of a live sandbox's cgroup, as its state.json records it: its id, or a
    pooled cgroup's name."""
    with open(os.path.join(runtime_base(), sandbox_id, "state.json")) as f:
        return json.load(f)["cgroup"]


def _in_sandbox(pid: int, sandbox_id: str, pool_prefix: str) -> bool:
    """Whether pid is (still) a process of that sandbox (or in a cgroup of the daemon's
    pool, which a sandbox it lent one to ran in), not a recycled pid."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return False
    return f"/corral/{sandbox_id}" in text or f"/corral/{pool_prefix}" in text


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def set_child_subreaper(on: bool) -> None:
    """PR_SET_CHILD_SUBREAPER: orphans of our children come to us to be reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap(pids, timeout_s: float = 5.0) -> None:
    """waitpid the given pids (our adopted orphans) until they are gone or time runs out."""
    pending = {p for p in pids if p}
    end = time.monotonic() + timeout_s
    while pending and time.monotonic() < end:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pending.discard(pid)  # not ours (never adopted, or already reaped)
                continue
            if done:
                pending.discard(pid)
        if pending:
            time.sleep(0.02)


# -- exec ------------------------------------------------------------------------------------


@dataclass
class ExecResult:
    exec_id: str = ""
    pid: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    returncode: int | None = None
    reason: str = ""
    stdout_seqs: list[int] = field(default_factory=list)


def collect_exec(events) -> ExecResult:
    """Drain an Exec or Attach stream."""
    res = ExecResult()
    out, err = bytearray(), bytearray()
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "started":
            res.exec_id, res.pid = ev.started.exec_id, ev.started.pid
        elif kind == "output":
            b = ev.output.batch
            if ev.output.stream == 1:
                out += b.text
                res.stdout_seqs.extend(range(b.first_seq, b.first_seq + len(b.lengths)))
            else:
                err += b.text
        elif kind == "exited":
            res.returncode, res.reason = ev.exited.returncode, ev.exited.reason
    res.stdout, res.stderr = bytes(out), bytes(err)
    return res


# -- sessions --------------------------------------------------------------------------------


def batch_entries(batch) -> list[tuple[int, int, bytes]]:
    """(seq, kind, payload) of every entry of a StreamBatch, tokens included, in seq order."""
    events = {e.seq: e for e in batch.events}
    count = len(batch.lengths) + len(batch.events)
    out, pos, tok = [], 0, 0
    for seq in range(batch.first_seq, batch.first_seq + count):
        if seq in events:
            e = events[seq]
            out.append((seq, e.kind, bytes(e.payload)))
        else:
            n = batch.lengths[tok]
            tok += 1
            out.append((seq, EVENT_TOKEN, bytes(batch.text[pos:pos + n])))
            pos += n
    return out


class SessionRecorder:
    """Reads one SessionStream on a thread; everything it saw, in order, under a lock."""

    def __init__(self, stream: SessionStream, *, release: threading.Event | None = None,
                 stop_after_seq: int | None = None):
        self.stream = stream
        #: When given, the reader stops after each batch until this is set: a stalled client.
        self.release = release
        self.stop_after_seq = stop_after_seq
        self.entries: list[tuple[int, int, bytes]] = []
        self.events: list[tuple[str, object]] = []  # (kind, message) of non-batch events
        self.lost = 0
        self.error: ClientError | None = None
        self.done = threading.Event()
        self.finished_at: float | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self.stream:
                kind = ev.WhichOneof("event")
                with self._cond:
                    if kind == "batch":
                        self.lost += ev.batch.lost.count
                        self.entries.extend(batch_entries(ev.batch))
                    else:
                        self.events.append((kind, getattr(ev, kind)))
                    self._cond.notify_all()
                if kind == "exited":
                    break
                if (self.stop_after_seq is not None and self.entries
                        and self.entries[-1][0] >= self.stop_after_seq):
                    self.stream.detach()
                    break
                if kind == "batch" and self.release is not None:
                    self.release.wait()
        except ClientError as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            with self._cond:
                self.done.set()
                self._cond.notify_all()

    def wait_for(self, predicate, timeout_s: float = 20.0, what: str = "") -> None:
        """Block until predicate(self) holds; fail with what was seen otherwise."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self) or self.done.is_set(), timeout_s)
            if ok and predicate(self):
                return
        raise AssertionError(f"timed out waiting for {what or predicate}: saw {self.summary()}")

    def join(self, timeout_s: float = 30.0) -> None:
        if not self.done.wait(timeout_s):
            raise AssertionError(f"session stream still open after {timeout_s}s: "
                                 f"{self.summary()}")

    # -- views ------------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        opened = self.first("opened")
        return opened.session_id if opened is not None else ""

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self.entries[-1][0] if self.entries else 0

    def tokens(self) -> list[str]:
        with self._cond:
            return [p.decode() for _, k, p in self.entries if k == EVENT_TOKEN]

    def seqs(self) -> list[int]:
        with self._cond:
            return [s for s, _, _ in self.entries]

    def of_kind(self, kind: str) -> list:
        with self._cond:
            return [m for k, m in self.events if k == kind]

    def first(self, kind: str):
        found = self.of_kind(kind)
        return found[0] if found else None

    def turn_ends(self) -> list[tuple[int, str]]:
        return [(m.turn, m.status) for m in self.of_kind("turn_ended")]

    def summary(self) -> str:
        toks = self.tokens()
        return (f"{len(toks)} tokens (last {toks[-3:]}), events "
                f"{[k for k, _ in self.events]}, error {self.error}")


def numbered(tokens: list[str]) -> list[int]:
    """The numbers of the stream agent's "tN" (or padded "tN:xx..") tokens, in order."""
    heads = (t.partition(":")[0] for t in tokens if t.startswith("t"))
    return [int(h[1:]) for h in heads if h[1:].isdigit()]
