"""Sandboxes as the daemon holds them: tenants, TTLs, commands with streamed output, files.

Domain layer: no gRPC types here. Kernel work (clone, cgroups, kill) runs on the daemon's
spawner threads, which live as long as the daemon: PR_SET_PDEATHSIG fires when the
*thread* that spawned a sandbox exits, so a short-lived worker thread would kill it.
Everything else runs on the event loop; no thread per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from corral.sandbox import Process, SandboxSpec, new_sandbox, ptys
from corral.sandbox.backends.base import SandboxLifecycle
from corral.sandbox.errors import (
    CorralError,
    Ended,
    FailedPrecondition,
    InvalidSpec,
    InvalidTransition,
    NotFound,
    ResourceExhausted,
    SandboxSetupError,
    Unavailable,
)
from corral.sandbox.spec import check_argv, check_env
from corral.sandbox.workspace import MAX_READ_BYTES, Workspace

from .auth import Caller, check_owner
from .command_journal import CommandJournal, output_hub, output_window
from .command_journal import keep as keep_command
from .command_journal import rebuild as rebuild_commands
from .fair import FairSlots
from .idempotency import RequestLedger
from .images import exec_on_image
from .labels import EVERYTHING, Selector
from .metrics import NO_METRICS
from .policy import PolicyBook, TenantPolicy
from .ports import PortTable, check_port
from .restore import KeptSandbox, LiveRestore, Recovered, unadoptable
from .secret_store import SecretStore
from .streams import StreamHub
from .tracing import NO_TRACING

log = logging.getLogger("corral.sandboxes")

MAX_INPUT_BYTES = 1 << 20
MAX_STDIN_BUFFER = 4 << 20
#: Spawner threads: kernel work of every tenant, in fair turns.
SPAWNERS = 2
#: Finished commands a sandbox remembers (for Attach and Get); older ones are forgotten.
MAX_FINISHED_EXECS = 64
#: Output the finished commands of one sandbox may keep in their replay logs, together;
#: past it the oldest finished ones are forgotten (a command's logs hold up to
#: stream_log_bytes + exec_replay_bytes each, and 64 of them would be gigabytes).
MAX_FINISHED_OUTPUT_BYTES = 64 << 20
#: Exec output already sent that a command's hubs keep for a client that drops and
#: resumes with Attach{after_seq}: more than a gRPC client has in flight (its HTTP/2
#: receive window, which BDP probing grew to 7 MiB in tests/integration/test_exec_lossless.py,
#: plus a 1 MiB message and the socket's buffers). grpc-go's window may reach 16 MiB.
DEFAULT_EXEC_REPLAY_BYTES = 24 << 20
#: Destroyed sandboxes the daemon remembers (for Destroy's already_destroyed, a replayed
#: Create and List{state: DESTROYED}); the oldest are forgotten first.
MAX_TOMBSTONES = 4096


def signal_command(process, sig: int) -> bool:
    """Signal a command's process group through its pidfd (a native Process), never by
    a number that may have been reused since it was reaped; a backend without process
    groups signals the command itself. True when delivered."""
    group = getattr(process, "signal_group", None)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group is not None:
            return group(sig)
        process.send_signal(sig)
        return True
    return False


class StdinWriter:
    """A command's stdin: raw bytes written into its pipe from the event loop, bounded.

    The sibling of streams.ControlWriter, which writes protocol frames to an agent's
    control pipe (frame kinds, merged interrupts, early EPIPE); this one only copies bytes.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, limit: int = MAX_STDIN_BUFFER):
        os.set_blocking(fd, False)
        self.fd = fd
        self._loop = loop
        self._buf = bytearray()
        self._limit = limit
        self._close_when_drained = False
        self.closed = False
        #: Called once when it closes (live restore: the holder's copy goes too).
        self.on_close: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        """Queue data; raises ResourceExhausted when the reader is too far behind."""
        if self.closed:
            raise Ended("stdin is closed")
        if len(self._buf) + len(data) > self._limit:
            raise ResourceExhausted(
                f"the command is not reading its stdin ({len(self._buf)} bytes queued)")
        was_empty = not self._buf
        self._buf += data
        if was_empty:
            self._flush()

    def close(self) -> None:
        """Close once everything queued is written."""
        self._close_when_drained = True
        if not self._buf:
            self._shut()

    def abort(self) -> None:
        """Close now, dropping anything queued (the command has exited). Idempotent."""
        self._buf.clear()
        self._shut()

    def _flush(self) -> None:
        while self._buf:
            try:
                n = os.write(self.fd, self._buf[:65536])
            except BlockingIOError:
                self._loop.add_writer(self.fd, self._on_writable)
                return
            except OSError:  # EPIPE: the command closed stdin or exited
                self._buf.clear()
                self._shut()
                return
            del self._buf[:n]
        with contextlib.suppress(Exception):
            self._loop.remove_writer(self.fd)
        if self._close_when_drained:
            self._shut()

    def _on_writable(self) -> None:
        self._flush()

    def _shut(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self.fd)
            os.close(self.fd)
            if self.on_close is not None:
                self.on_close()


@dataclass
class ExecHandle:
    """A command the daemon started in a sandbox, with its output hubs."""

    id: str
    sandbox_id: str
    argv: tuple[str, ...]
    process: Process
    stdout: StreamHub
    stderr: StreamHub
    stdin: StdinWriter | None
    started_at: float
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    returncode: int | None = None
    reason: str = ""
    duration_s: float = 0.0
    pid: int = 0  # host pid at the spawn (the Process forgets it once reaped)
    #: Its output's replay windows on disk (live restore: runtime/command_journal.py).
    journal: CommandJournal | None = None

    @property
    def running(self) -> bool:
        return self.returncode is None


@dataclass
class ManagedSandbox:
    """A sandbox plus what the daemon knows about it."""

    id: str
    tenant: str
    spec: SandboxSpec
    sandbox: SandboxLifecycle
    policy_digest: str
    created_at: float
    expires_at: float
    workspace: Workspace
    execs: dict[str, ExecHandle] = field(default_factory=dict)
    owner_session: str | None = None
    destroyed: bool = False
    #: The client's key/value metadata (runtime/labels.py), checked.
    labels: dict[str, str] = field(default_factory=dict)
    #: Creation order in this daemon: List pages in this order.
    seq: int = 0
    #: Unix seconds of the pause while paused (Pause), else 0.
    paused_at: float = 0.0
    #: Set while the sandbox runs (not paused): what an exec with wait_if_paused awaits.
    unpaused: asyncio.Event = field(default_factory=asyncio.Event)
    #: The warm pool (runtime/pools.py) it was made for; "" for a cold create.
    pool: str = ""
    #: Kept across daemon restarts (live restore, runtime/restore.py).
    kept: bool = False
    #: (what it was made of, its encoded Sandbox message): List's cache (runtime/api/
    #: sandboxes.py sandbox_wire), rebuilt when any field the message shows changes.
    wire_cache: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.unpaused.set()


def _workspace_files(sandbox: SandboxLifecycle) -> Workspace:
    """The file API's view of /workspace. What it creates belongs to root inside: the
    sandbox's uid_base outside, or, in a host directory shown as it is (idmapped), to that
    directory's owner. A copy-on-write workspace is its merged overlay (host files are
    root's inside there too; apply gives them the owner)."""
    spec = sandbox.spec
    if spec.workspace is not None and not spec.workspace_cow:
        st = os.stat(spec.workspace)
        return Workspace(sandbox.workspace, st.st_uid, st.st_gid)
    return Workspace(sandbox.workspace, spec.uid_base, spec.uid_base)


@dataclass
class DestroyedSandbox:
    """What the daemon remembers of a destroyed sandbox (MAX_TOMBSTONES of them)."""

    id: str
    tenant: str
    spec: SandboxSpec
    policy_digest: str
    created_at: float
    expires_at: float
    labels: dict[str, str]
    seq: int
    owner_session: str | None = None
    destroyed: bool = True
    paused_at: float = 0.0
    sandbox: None = None
    execs: dict = field(default_factory=dict)
    wire_cache: tuple | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SandboxLimits:
    """The daemon's bounds on sandboxes, from its config (runtime/config.py)."""

    #: The longest lifetime (sandbox_ttl): a request may ask for less, never more.
    default_ttl_s: float = 3600.0
    #: How long a sandbox may stay paused (paused_ttl): its TTL clock stands still meanwhile.
    paused_ttl_s: float = 86400.0
    #: Sandboxes alive at once, sessions' included.
    max_sandboxes: int = 512
    #: Replay log of each output stream, in bytes (a lossless one holds a quarter of it).
    stream_log_bytes: int = 8 << 20
    #: Output already sent that a lossless stream keeps on top, for a reader that resumes.
    exec_replay_bytes: int = DEFAULT_EXEC_REPLAY_BYTES


class SandboxManager:
    """Every sandbox of the daemon, by id, with tenant checks on each access."""

    metrics = NO_METRICS  # the daemon's DaemonMetrics when --metrics is on
    tracing = NO_TRACING  # the daemon's Tracing when --tracing is on

    def __init__(self, audit, limits: SandboxLimits | None = None, *,
                 runtime_dir: str | None = None, policies: PolicyBook | None = None):
        self.audit = audit
        #: Each tenant's operator policy (runtime/policy.py): what it may ask for and hold.
        self.policies = policies or PolicyBook(TenantPolicy.tenant_default(), {})
        #: The daemon's own bounds (lifetimes, count, stream memory).
        self.limits = limits or SandboxLimits()
        self.runtime_dir = runtime_dir
        self._sandboxes: dict[str, ManagedSandbox] = {}
        #: The same sandboxes by tenant, each tenant's in creation (seq) order: List reads
        #: one page of them and Create counts them without a scan of every tenant's.
        self._by_tenant: dict[str, dict[str, ManagedSandbox]] = {}
        self._indexed_as: dict[str, str] = {}  # sandbox id -> the tenant it is indexed under
        self._seq = 0
        self._tombstones: OrderedDict[str, DestroyedSandbox] = OrderedDict()
        #: Create's request_id (runtime/idempotency.py): sandbox ids by tenant and id.
        self.requests = RequestLedger("sandbox")
        self._spawner = ThreadPoolExecutor(max_workers=SPAWNERS, thread_name_prefix="corral-spawn")
        self._turns = FairSlots(SPAWNERS)
        self._pending = 0
        self._creating = 0
        self._pending_by_tenant: dict[str, int] = {}
        self._reaper: asyncio.Task | None = None
        self._shutting_down = False
        #: Called with "sandbox" or "exec" before either starts: raises ResourceExhausted
        #: when the daemon cannot afford it (disk, descriptors: runtime/resources.py).
        self.admission: Callable[[str], None] = lambda kind: None
        #: Exposed ports (runtime/ports.py): host listeners forwarding into sandboxes.
        self.ports = PortTable()
        #: Where spec.secrets' values come from (runtime/secret_store.py; the daemon's
        #: [secrets]); an empty store refuses every binding by name.
        self.secrets = SecretStore()
        #: The daemon's warm pools (runtime/pools.py WarmPools), None when it has none: a
        #: matching Create takes a ready sandbox of theirs instead of spawning one.
        self.pools = None
        #: Live restore (runtime/restore.py), None when off: sandboxes that can be adopted
        #: are spawned to outlive the daemon and recorded for the next one.
        self.live_restore: LiveRestore | None = None

    # -- lifecycle of the manager ------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_expired())

    def refuse_new(self) -> None:
        """From now on Create and Exec answer UNAVAILABLE (the daemon is stopping)."""
        self._shutting_down = True

    async def shutdown(self, reason: str = "daemon-shutdown") -> None:
        """Destroy every sandbox but those live restore keeps for the next daemon (they
        run on, held: an upgrade is a stop and a start); the spawner threads go last."""
        self._shutting_down = True
        if self._reaper is not None:
            self._reaper.cancel()
        for msb in list(self._sandboxes.values()):
            with contextlib.suppress(Exception):
                if msb.kept:
                    await self._let_go(msb)
                else:
                    await self._destroy(msb, reason, tenant="", peer="daemon")
        self._spawner.shutdown(wait=True)

    async def run_blocking(self, fn: Callable, *args, tenant: str = ""):
        """Run kernel work on a spawner thread (see the module docstring), taking turns
        with other tenants' work (runtime/fair.py): one tenant's burst never queues
        another tenant's create or exec behind all of it, and a tenant that is not an
        operator holds one spawner less than there are, so one is free for the others."""
        limit = (None if self.policies.of_tenant(tenant) is self.policies.operator_default
                 else max(1, SPAWNERS - 1))
        async with self._turns.turn(tenant, limit):
            return await asyncio.get_running_loop().run_in_executor(self._spawner, fn, *args)

    # -- sandboxes ----------------------------------------------------------------------------

    async def create(self, caller: Caller, spec: SandboxSpec, ttl_s: float | None = None,
                     owner_session: str | None = None,
                     labels: dict[str, str] | None = None) -> ManagedSandbox:
        """Start a sandbox of the caller's.

        Args:
            labels: already checked (runtime/labels.py check_labels).
        """
        if self._shutting_down:
            raise Unavailable("the daemon is shutting down")
        self._creating += 1  # warm pools' refills wait for it (runtime/pools.py)
        try:
            return await self._create(caller, spec, ttl_s, owner_session, labels)
        finally:
            self._creating -= 1

    @property
    def creating(self) -> int:
        """Creates under way now (a pool hit's included), which warm pools' refills wait
        for: a refill started meanwhile would take the CPU a live Create is using."""
        return self._creating

    async def _create(self, caller: Caller, spec: SandboxSpec, ttl_s: float | None,
                      owner_session: str | None,
                      labels: dict[str, str] | None) -> ManagedSandbox:
        t0 = self.metrics.clock()
        self.admission("sandbox")
        rules = self.policies.of(caller)
        rules.check_sandbox(spec)
        # The tenant's quota before the daemon's: one tenant never fills the daemon alone.
        tenant = caller.tenant
        rules.check_count("sandboxes", self.count(tenant) + self._pending_by_tenant.get(
            tenant, 0), "max_sandboxes")
        if ttl_s and ttl_s > self.limits.default_ttl_s:  # refused, never quietly shortened
            raise InvalidSpec("spec.ttl_s", f"{ttl_s:g} is over the daemon's maximum of "
                                            f"{self.limits.default_ttl_s:g} (sandbox_ttl)")
        ttl = rules.ttl(ttl_s, self.limits.default_ttl_s)
        # a warm pool's ready sandbox (runtime/pools.py) already counts in max_sandboxes
        msb = (await self.pools.acquire(caller, spec, ttl, owner_session, labels)
               if self.pools else None)
        if msb is None:
            if len(self._sandboxes) + self._pending >= self.limits.max_sandboxes:
                raise ResourceExhausted(
                    f"the daemon already runs {self.limits.max_sandboxes} sandboxes")
            msb = await self.launch(tenant, spec, expires_in=ttl, owner_session=owner_session,
                                    labels=labels,
                                    keep=not self.not_kept_because(spec, owner_session))
        await self.audit_created(caller, msb, ttl, msb.pool)
        self.metrics.sandbox_created(spec.backend, t0)
        return msb

    async def launch(self, tenant: str, spec: SandboxSpec, *, expires_in: float,
                     owner_session: str | None = None,
                     labels: dict[str, str] | None = None, keep: bool = False,
                     secret_values: dict[str, bytes] | None = None) -> ManagedSandbox:
        """Spawn a sandbox and hold it as `tenant`'s: the one path every sandbox takes (a
        cold Create, and a warm pool's fill, whose tenant is "" until it is acquired). No
        quota check and no audit record here: the caller makes both.

        Args:
            keep: live restore keeps it across restarts (not_kept_because() said it can):
                its PID 1 does not die with the daemon.
            secret_values: the values of spec.secrets, given by the daemon itself (a warm
                pool's birth secret, runtime/pools.py); None: from the store.
        """
        if keep:
            spec = replace(spec, die_with_parent=False)
        policy: dict[str, str] = {}  # the digest, known once the sandbox is prepared
        # a docker sandbox is a container on the engine at the daemon's DOCKER_HOST
        # secret values come from the daemon's store, for this tenant; never from a client
        values = secret_values if secret_values is not None else (
            await self.run_blocking(self.secrets.values_for, tenant, spec.secrets)
            if spec.secrets else None)
        sandbox = new_sandbox(spec, runtime_dir=self.runtime_dir,
                              on_net_event=self.net_listener(tenant, policy),
                              secrets=values, tenant=tenant)
        del values  # the sandbox holds them now; nothing here keeps a copy
        if self.live_restore is not None and not spec.die_with_parent and spec.backend == "native":
            sandbox.kept_by = self.live_restore.state_dir  # unheld at a crash: killed at start
        self._pending += 1
        self._pending_by_tenant[tenant] = self._pending_by_tenant.get(tenant, 0) + 1
        try:
            await self.run_blocking(self.tracing.phase_in_thread(
                self.metrics.timed_spawn(sandbox.start, spec.backend), "sandbox.spawn",
                backend=spec.backend), tenant=tenant)
        finally:
            self._pending -= 1
            if self._pending_by_tenant[tenant] == 1:
                del self._pending_by_tenant[tenant]
            else:
                self._pending_by_tenant[tenant] -= 1
        now = time.time()
        digest = sandbox.policy_digest()
        policy["digest"] = digest
        msb = ManagedSandbox(
            id=sandbox.id, tenant=tenant, spec=sandbox.spec, sandbox=sandbox,
            policy_digest=digest, created_at=now, expires_at=now + expires_in,
            workspace=_workspace_files(sandbox),
            owner_session=owner_session, labels=dict(labels or {}),
        )
        self._sandboxes[msb.id] = msb
        self.renumber(msb)
        # PID 1 reports every exit on the status pipe; the loop reads it (no thread).
        asyncio.get_running_loop().add_reader(sandbox.status_fd, self._collect_exits, msb,
                                              sandbox.status_fd)
        if keep:
            self.keep(msb)
        return msb

    def keep(self, msb: ManagedSandbox) -> None:
        """Live restore keeps msb across restarts from now on (at its spawn, or when a
        warm pool hands it to a tenant): its descriptors to the holder, its row written."""
        msb.kept = True
        self.live_restore.keep(msb.sandbox, KeptSandbox(
            msb.id, msb.tenant, msb.spec.to_fields(), msb.labels, msb.created_at,
            msb.expires_at, msb.paused_at, msb.owner_session or ""))

    def not_kept_because(self, spec: SandboxSpec, owner_session: str | None) -> str:
        """Why a sandbox of spec would not outlive a daemon restart; "" when live restore
        keeps it. Such a sandbox is still made (dies with the daemon, as with live restore
        off): a Create never fails over an operator's setting, and sandbox.create says so."""
        if self.live_restore is None:
            return "live restore is off"
        kept = unadoptable(spec)
        return f"its {', '.join(kept)} live in the daemon" if kept else ""

    def restore(self, recovered: list[Recovered]) -> int:
        """Hold the sandboxes live restore adopted at start (runtime/restore.py recover())
        as the dead daemon did: tenant, labels, TTL, pause; their exits are collected again
        and their TTLs reaped. Each is audited (sandbox.restore, with the reason for a lost
        one); returns how many were restored."""
        loop = asyncio.get_running_loop()
        now, mono = time.time(), time.monotonic()
        for result in recovered:
            if result.sandbox is not None and result.sandbox.spec.allow_net and \
                    result.sandbox.spec.backend == "native":  # docker: no egress link
                self._relink_egress(result)
            row, sandbox = result.row, result.sandbox
            if sandbox is None:
                self.audit.append("sandbox.restore", tenant=row.tenant, peer="daemon",
                                  sandbox_id=row.id, detail={"restored": False,
                                                             "reason": result.reason})
                continue
            if row.paused_at:  # frozen all along: its pause clock counts the downtime
                sandbox.state = "paused"
                sandbox._paused_at = mono - max(0.0, now - row.paused_at)
            msb = ManagedSandbox(
                id=row.id, tenant=row.tenant, spec=sandbox.spec, sandbox=sandbox,
                policy_digest=sandbox.policy_digest(), created_at=row.created_at,
                expires_at=row.expires_at, workspace=_workspace_files(sandbox),
                labels=dict(row.labels), paused_at=row.paused_at, kept=True,
                owner_session=row.owner_session or None)
            if row.paused_at:
                msb.unpaused.clear()
            self._sandboxes[msb.id] = msb
            self.renumber(msb)
            # what PID 1 reported while no daemon read comes first (unclaimed exits)
            loop.add_reader(sandbox.status_fd, self._collect_exits, msb, sandbox.status_fd)
            rebuilt, problems = rebuild_commands(self, msb, result.commands)
            for problem in problems:
                log.warning("sandbox %s: a command's journal is lost: %s", msb.id, problem)
            for key, fds in result.commands.items():  # held, but with no journal
                for fd in fds:
                    self._drain_orphan_output(key, fd)
            self.audit.append("sandbox.restore", tenant=row.tenant, peer="daemon",
                              sandbox_id=row.id, detail={
                                  "restored": True, "init_pid": sandbox.init_pid,
                                  "paused": bool(row.paused_at),
                                  "expires_at": round(row.expires_at, 3),
                                  "commands": rebuilt})
        return sum(1 for r in recovered if r.sandbox is not None)

    def _relink_egress(self, result: Recovered) -> None:
        """A restored sandbox's egress served again on what the holder kept (sandbox/net.py
        relink_kept), its secrets' values read from the store again, its attempts audited
        as before; one that cannot be is killed and reported lost (result.reason)."""
        from corral.sandbox import net

        sandbox, row = result.sandbox, result.row
        fds, result.egress = result.egress, []
        policy = {"digest": sandbox.policy_digest()}  # stamped on its egress records
        listener = self.net_listener(row.tenant, policy)
        try:
            values = (self.secrets.values_for(row.tenant, sandbox.spec.secrets)
                      if sandbox.spec.secrets else None)
            sandbox.egress, sandbox.secrets = net.relink_kept(
                row.id, fds, sandbox.spec.allow_net, sandbox.spec.secrets, values, listener)
            del values
        except (CorralError, OSError) as exc:
            result.reason = f"its egress cannot be served again: {exc}"
            result.sandbox = None
            for held in [*result.commands.values(), *result.sessions.values()]:
                for fd in held:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            result.commands, result.sessions = {}, {}
            sandbox._frozen = bool(row.paused_at and sandbox._cgroup)  # killed frozen
            with contextlib.suppress(CorralError, OSError):
                sandbox.destroy()
            self.live_restore.forget(row.id)
            return
        sandbox.on_net_event = listener
        if sandbox.egress.attachment.steering is None:
            sandbox.notes.append(net.ROOTLESS_NOTE)

    def _drain_orphan_output(self, key: str, fd: int) -> None:
        """Read and drop what a command of the dead daemon writes, so that it runs on
        (no client can attach to it: the docs say so); at its end, the holder forgets it."""
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                while os.read(fd, 1 << 16):
                    pass
            except BlockingIOError:
                return  # all read for now
            except OSError:
                pass  # as good as its end
            loop.remove_reader(fd)
            os.close(fd)
            sandbox_id, _, exec_id = key.partition("/")
            self.live_restore.forget_command(sandbox_id, exec_id)

        loop.add_reader(fd, readable)

    def _record(self, msb: ManagedSandbox) -> None:
        """Its TTL deadline and pause, for the next daemon (a kept sandbox only)."""
        if msb.kept and self.live_restore is not None:
            self.live_restore.update(msb.id, msb.expires_at, msb.paused_at)

    async def _let_go(self, msb: ManagedSandbox) -> None:
        """A kept sandbox at a clean stop: it runs on, its descriptors held for the next
        daemon; this one stops reading its exits and serving its ports."""
        if msb.sandbox.status_fd >= 0:
            asyncio.get_running_loop().remove_reader(msb.sandbox.status_fd)
        await self._close_ports(msb, "daemon-shutdown")

    def renumber(self, msb: ManagedSandbox) -> None:
        """Give msb the next place in creation order (List pages in it): at its spawn,
        and again when a warm pool hands it to a tenant."""
        self._seq += 1
        msb.seq = self._seq
        if self._sandboxes.get(msb.id) is msb:  # a destroyed one stays out of the index
            self._unindex(msb.id)
            self._by_tenant.setdefault(msb.tenant, {})[msb.id] = msb
            self._indexed_as[msb.id] = msb.tenant

    def _unindex(self, sandbox_id: str) -> None:
        """Take a sandbox out of its tenant's order (renumbered, maybe for a new tenant
        when a warm pool hands it over, or destroyed)."""
        tenant = self._indexed_as.pop(sandbox_id, None)
        if tenant is not None:
            held = self._by_tenant[tenant]
            del held[sandbox_id]
            if not held:
                del self._by_tenant[tenant]

    @property
    def pending(self) -> int:
        """Sandboxes being spawned now (cold creates and warm pools' fills)."""
        return self._pending

    async def audit_created(self, caller: Caller, msb: ManagedSandbox, ttl: float,
                            pool: str = "") -> None:
        """The sandbox.create record of a sandbox handed to caller (pool: the warm pool
        it came from, runtime/pools.py)."""
        spec = msb.spec
        await self.audit.record(
            "sandbox.create", tenant=caller.tenant, peer=caller.peer, sandbox_id=msb.id,
            session_id=msb.owner_session or "",
            detail={"policy_digest": msb.policy_digest, "profile": spec.profile,
                    "memory_bytes": spec.memory_bytes, "pids_max": spec.pids_max,
                    "cpus": spec.cpus, "ttl_s": ttl, "init_pid": msb.sandbox.init_pid,
                    "allow_net": list(spec.allow_net), "backend": spec.backend,
                    **({"labels": msb.labels} if msb.labels else {}),
                    **({"pool": pool} if pool else {}),
                    **self._restart_detail(msb)},
        )

    def _restart_detail(self, msb: ManagedSandbox) -> dict:
        """With live restore on: whether the sandbox outlives a restart, and why not."""
        if self.live_restore is None:
            return {}
        if msb.kept:
            return {"live_restore": "kept"}
        why = self.not_kept_because(msb.spec, msb.owner_session) or "a warm pool's sandbox"
        return {"live_restore": f"dies with the daemon: {why}"}

    async def create_once(self, caller: Caller, spec: SandboxSpec, *, ttl_s: float | None,
                          labels: dict[str, str], request_id: str, fingerprint: str):
        """create(), once per request_id of this tenant (runtime/idempotency.py): a retry
        gets the sandbox the first request made, live or (a DestroyedSandbox) destroyed.

        Raises:
            RequestIdReused: the request_id made a sandbox for a different request.
            NotFound: the sandbox it made is destroyed and no longer remembered.
        """
        if not request_id:
            return await self.create(caller, spec, ttl_s=ttl_s, labels=labels)

        async def make() -> str:
            msb = await self.create(caller, spec, ttl_s=ttl_s, labels=labels)
            return msb.id

        sandbox_id, _ = await self.requests.run(caller.tenant, request_id, fingerprint, make)
        return self.get_or_destroyed(caller, sandbox_id)

    def net_listener(self, tenant: str, policy: dict):
        """What the egress proxy calls (on its thread) for each attempt of tenant's
        sandbox: an audit record on the loop. policy["digest"] is stamped on each, read
        when the record is made (the digest is known only once the sandbox started)."""
        loop = asyncio.get_running_loop()
        return lambda event: loop.call_soon_threadsafe(self._net_event, tenant, policy, event)

    def _net_event(self, tenant: str, policy: dict, event: dict) -> None:
        """An egress attempt (proxy thread -> loop): one audit record, kind net.*."""
        detail = dict(event)
        kind = detail.pop("kind", "net.connect")
        sandbox_id = detail.pop("sandbox_id", "")
        detail["policy_digest"] = policy.get("digest", "")  # the policy that decided
        future = self.audit.submit_background(kind, tenant=tenant, peer="egress",
                                              sandbox_id=sandbox_id, detail=detail)
        future.add_done_callback(
            lambda f: f.exception() and log.error("egress audit record lost: %s", f.exception()))

    async def inspect(self, caller: Caller, sandbox_id: str) -> tuple[dict, list[str], str]:
        """The live policy report of a sandbox, its mismatches with the spec, its digest."""
        from corral.sandbox import effective as live

        msb = self.get(caller, sandbox_id)
        rep = await asyncio.get_running_loop().run_in_executor(
            None, live.report, msb.sandbox, msb.spec)
        problems = live.mismatches(rep, msb.spec)
        await self.audit.record("sandbox.inspect", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id,
                                detail={"policy_digest": msb.policy_digest, "mismatches": problems})
        return rep, problems, msb.policy_digest

    def get(self, caller: Caller, sandbox_id: str) -> ManagedSandbox:
        """The caller's sandbox; another tenant's is NOT_FOUND like an unknown id (and
        audited as a denial)."""
        msb = self._sandboxes.get(sandbox_id)  # live ones only: _destroy removes it
        missing = f"sandbox {sandbox_id!r} does not exist"
        if msb is None:
            raise NotFound(missing)
        check_owner(caller, msb.tenant, "sandbox", sandbox_id, missing)
        return msb

    def list(self, caller: Caller) -> list[ManagedSandbox]:
        return list(self._by_tenant.get(caller.tenant, {}).values())

    def find_live(self, caller: Caller, sandbox_id: str) -> ManagedSandbox | None:
        """The caller's live sandbox, or None (no denial recorded: for a caller that
        already owns something of it, e.g. its change set)."""
        msb = self._sandboxes.get(sandbox_id)
        return msb if msb is not None and msb.tenant == caller.tenant else None

    def find(self, caller: Caller, selector: Selector = EVERYTHING, *,
             destroyed: bool = False) -> Iterator:
        """The caller's live sandboxes (or, destroyed=True, the destroyed ones the daemon
        still remembers) whose labels match selector, in creation order.

        Lazy for live ones: a page of List reads its page and one more, never every
        sandbox (consume it before the next await: it walks the live index)."""
        if destroyed:  # at most MAX_TOMBSTONES, in destroy order
            found = [m for m in self._tombstones.values()
                     if m.tenant == caller.tenant and selector.matches(m.labels)]
            return iter(sorted(found, key=lambda m: m.seq))
        held = self._by_tenant.get(caller.tenant, {})
        if not selector.requirements:  # the usual List: no filter to call for each
            return iter(held.values())
        return (m for m in held.values() if selector.matches(m.labels))

    def get_or_destroyed(self, caller: Caller, sandbox_id: str):
        """The caller's sandbox, live or remembered as destroyed (a DestroyedSandbox)."""
        gone = self._tombstones.get(sandbox_id)
        if gone is not None and gone.tenant == caller.tenant:
            return gone
        return self.get(caller, sandbox_id)

    def usage(self, caller: Caller, sandbox_id: str) -> dict:
        """One usage sample of the caller's sandbox (Sandboxes.Stats); blocking reads of
        cgroup files, /proc or the engine: call it off the loop. Keys a host cannot measure
        are absent."""
        msb = self.get(caller, sandbox_id)
        raw = {k: v for k, v in msb.sandbox.stats().items() if v is not None}
        sample: dict = {"time": time.time(), "memory_limit_bytes": msb.spec.memory_bytes,
                        "pids_limit": msb.spec.pids_max}
        for key in ("cpu_usage_us", "cpu_throttled_periods", "memory_bytes",
                    "memory_peak_bytes", "pids", "oom_kills", "io_read_bytes",
                    "io_write_bytes"):
            if key in raw:
                sample[key] = int(raw[key])
        if "io_read_bytes" not in sample:  # no cgroup counter: the live processes' own
            read = written = 0
            seen = False
            for pid in msb.sandbox.pids():
                with contextlib.suppress(OSError, ValueError):
                    with open(f"/proc/{pid}/io") as f:
                        fields = dict(line.split(":", 1) for line in f.read().splitlines())
                    read += int(fields["read_bytes"])
                    written += int(fields["write_bytes"])
                    seen = True
            if seen:
                sample["io_read_bytes"], sample["io_write_bytes"] = read, written
        from corral.sandbox import workspace_fs

        root = getattr(msb.workspace, "root", None)
        if root and msb.spec.workspace is None and workspace_fs.kind() == "tmpfs":
            # a workspace of its own, on its own capped tmpfs: statvfs is its use
            with contextlib.suppress(OSError):
                used = workspace_fs.usage(root)
                if used:
                    sample["workspace_bytes"] = used["bytes_used"]
                    sample["workspace_bytes_max"] = used["bytes_max"]
        return sample

    async def set_timeout(self, caller: Caller, sandbox_id: str, ttl_s: float) -> ManagedSandbox:
        """Make the sandbox expire ttl_s seconds from now (longer or shorter than before).

        Raises:
            InvalidSpec: ttl_s under 1 second or over the daemon's maximum (sandbox_ttl).
            PolicyDenied: over the tenant's max_ttl.
        """
        msb = self.get(caller, sandbox_id)
        if not ttl_s or ttl_s < 1:
            raise InvalidSpec("ttl_s", "must be at least 1 second")
        if ttl_s > self.limits.default_ttl_s:
            raise InvalidSpec("ttl_s", f"{ttl_s:g} is over the daemon's maximum of "
                                       f"{self.limits.default_ttl_s:g} (sandbox_ttl)")
        self.policies.of(caller).ttl(ttl_s, self.limits.default_ttl_s, field_name="ttl_s")
        before = msb.expires_at
        msb.expires_at = time.time() + ttl_s
        self._record(msb)
        await self.audit.record("sandbox.timeout", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=msb.id, session_id=msb.owner_session or "",
                                detail={"ttl_s": ttl_s, "expires_at": round(msb.expires_at, 3),
                                        "previous_expires_at": round(before, 3)})
        return msb

    async def pause(self, caller: Caller, sandbox_id: str) -> ManagedSandbox:
        """Freeze the sandbox in place; its TTL clock stops (paused_ttl bounds the pause).
        Pausing a paused sandbox changes nothing.

        Raises:
            UnsupportedHost: it cannot be frozen here (rootless, with no cgroup).
            SandboxSetupError: the freeze timed out (it is thawed and keeps running).
        """
        msb = self.get(caller, sandbox_id)
        if not await self.run_blocking(msb.sandbox.pause, tenant=msb.tenant):
            return msb
        msb.paused_at = time.time()
        msb.unpaused.clear()
        self._record(msb)
        left = round(max(0.0, msb.expires_at - msb.paused_at), 3)
        await self.audit.record("sandbox.pause", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=msb.id, session_id=msb.owner_session or "",
                                detail={"ttl_left_s": left})
        return msb

    async def resume(self, caller: Caller, sandbox_id: str) -> ManagedSandbox:
        """Thaw a paused sandbox: its TTL and its commands' time limits move on by the time
        it spent paused. Resuming a running sandbox changes nothing."""
        msb = self.get(caller, sandbox_id)
        if not msb.paused_at:
            return msb
        paused_for = await self.run_blocking(msb.sandbox.resume, tenant=msb.tenant)
        msb.expires_at += paused_for
        msb.paused_at = 0.0
        msb.unpaused.set()
        self._record(msb)
        loop = asyncio.get_running_loop()
        for handle in msb.execs.values():  # their deadlines moved on: time them again
            if handle.running and handle.process.deadline is not None:
                loop.call_at(loop.time() + handle.process.remaining(), self._expire, handle)
        await self.audit.record("sandbox.resume", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=msb.id, session_id=msb.owner_session or "",
                                detail={"paused_s": round(paused_for, 3),
                                        "expires_at": round(msb.expires_at, 3)})
        return msb

    async def _until_running(self, msb: ManagedSandbox, wait_if_paused: bool) -> None:
        """Return once the sandbox is not paused, or refuse at once (wait_if_paused False).

        Raises:
            FailedPrecondition: it is paused and the request would not wait.
            NotFound: it was destroyed while the request waited.
        """
        if not msb.paused_at:
            return
        if not wait_if_paused:
            raise FailedPrecondition(f"sandbox {msb.id} is paused: resume it first (or "
                                     f"ask to wait: wait_if_paused)")
        await msb.unpaused.wait()
        if msb.destroyed:
            raise NotFound(f"sandbox {msb.id} was destroyed while paused")

    def all(self) -> list[ManagedSandbox]:
        return list(self._sandboxes.values())

    @property
    def held(self) -> int:
        """Live sandboxes of every tenant, pooled ones included (max_sandboxes counts them)."""
        return len(self._sandboxes)

    def count(self, tenant: str) -> int:
        """Live sandboxes of one tenant (what its max_sandboxes quota counts)."""
        return len(self._by_tenant.get(tenant, ()))

    async def destroy(self, caller: Caller, sandbox_id: str, reason: str = "requested") -> bool:
        """Destroy the caller's sandbox; True when it was already destroyed (the daemon
        remembers the last MAX_TOMBSTONES; older ids are NOT_FOUND)."""
        gone = self._tombstones.get(sandbox_id)
        if gone is not None and gone.tenant == caller.tenant:
            return True
        msb = self.get(caller, sandbox_id)
        await self._destroy(msb, reason, caller.tenant, caller.peer)
        return False

    def _collect_exits(self, msb: ManagedSandbox, fd: int) -> None:
        msb.sandbox.collect_exits()
        if msb.sandbox.status_fd != fd:  # PID 1 is gone and the pipe was closed
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)

    async def _destroy(self, msb: ManagedSandbox, reason: str, tenant: str, peer: str) -> None:
        if msb.destroyed:
            return
        msb.destroyed = True
        self._sandboxes.pop(msb.id, None)
        self._unindex(msb.id)
        self._tombstones[msb.id] = DestroyedSandbox(
            id=msb.id, tenant=msb.tenant, spec=msb.spec, policy_digest=msb.policy_digest,
            created_at=msb.created_at, expires_at=msb.expires_at, labels=msb.labels,
            seq=msb.seq, owner_session=msb.owner_session)
        msb.unpaused.set()  # an exec waiting for a resume sees it destroyed
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        for handle in msb.execs.values():  # its commands die: no reader holds them back
            handle.stdout.release_flow_control()
            handle.stderr.release_flow_control()
        if msb.sandbox.status_fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(msb.sandbox.status_fd)
        await self._close_ports(msb, "sandbox-destroyed")
        await self.run_blocking(msb.sandbox.destroy, tenant=msb.tenant)
        # after the kill: the holder's copies of its descriptors go last (a warm pool's
        # sandbox spawned to be kept is held from its fill on: runtime/pools.py)
        if msb.kept or (self.live_restore is not None and not msb.spec.die_with_parent):
            self.live_restore.forget(msb.id)
        await self.audit.record("sandbox.destroy", tenant=tenant or msb.tenant, peer=peer,
                                sandbox_id=msb.id, session_id=msb.owner_session or "",
                                detail={"reason": reason})

    # -- exposed ports (runtime/ports.py) --------------------------------------------------

    async def expose_port(self, caller: Caller, sandbox_id: str, port: int, host_port: int):
        """Forward 127.0.0.1:host_port on the host to 127.0.0.1:port in the sandbox.

        Raises:
            InvalidSpec: a port out of range. NotFound: not the caller's sandbox.
            QuotaExceeded: over max_exposed_ports. PortAlreadyExposed, HostPortInUse.
            InvalidTransition: a backend without a network namespace of its own here.
        """
        check_port("port", port)
        check_port("host_port", host_port, zero_ok=True)
        msb = self.get(caller, sandbox_id)
        if msb.spec.backend != "native" or not getattr(msb.sandbox, "init_pid", None):
            raise InvalidTransition(f"sandbox {sandbox_id!r}: ports can be exposed only for "
                                    f"native sandboxes for now (backend "
                                    f"{msb.spec.backend!r})")
        self.policies.of(caller).check_count("exposed ports", self.ports.count(caller.tenant),
                                             "max_exposed_ports")
        exposed = await self.ports.expose(msb.id, caller.tenant, msb.sandbox.init_pid, port,
                                          host_port)
        if msb.destroyed:  # destroyed while the listener was being made
            await self.ports.unexpose(msb.id, port)
            raise NotFound(f"sandbox {sandbox_id!r} does not exist")
        await self.audit.record("sandbox.port.expose", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=msb.id,
                                detail={"port": port, "host_address": exposed.host_address,
                                        "host_port": exposed.host_port})
        return exposed

    async def unexpose_port(self, caller: Caller, sandbox_id: str, port: int):
        check_port("port", port)
        msb = self.get(caller, sandbox_id)
        exposed = self.ports.get(msb.id, port)
        if exposed is None:
            raise NotFound(f"port {port} of sandbox {sandbox_id!r} is not exposed")
        await self.ports.unexpose(msb.id, port)
        self._port_audit(msb, exposed, caller.tenant, caller.peer, "requested")
        return exposed

    def list_ports(self, caller: Caller, sandbox_id: str):
        return self.ports.of_sandbox(self.get(caller, sandbox_id).id)

    async def _close_ports(self, msb: ManagedSandbox, reason: str) -> None:
        for exposed in await self.ports.close_sandbox(msb.id):
            self._port_audit(msb, exposed, msb.tenant, "daemon", reason)

    def _port_audit(self, msb: ManagedSandbox, exposed, tenant: str, peer: str,
                    reason: str) -> None:
        self.audit.append("sandbox.port.unexpose", tenant=tenant, peer=peer, sandbox_id=msb.id,
                          detail={"port": exposed.port, "host_port": exposed.host_port,
                                  "connections": exposed.connections, "reason": reason})

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for msb in list(self._sandboxes.values()):
                if msb.destroyed:
                    continue
                if msb.paused_at:  # its TTL clock stands still; the pause has its own
                    reason = "paused-ttl" if now - msb.paused_at >= self.limits.paused_ttl_s else ""
                else:
                    reason = "ttl" if msb.expires_at <= now else ""
                if reason:
                    log.info("sandbox %s reached its %s", msb.id,
                             "TTL" if reason == "ttl" else "paused TTL (paused_ttl)")
                    with contextlib.suppress(Exception):
                        await self._destroy(msb, reason, "", "daemon")

    # -- commands -----------------------------------------------------------------------------

    async def exec(self, caller: Caller, sandbox_id: str, argv: list[str], *,
                   env: dict[str, str] | None = None, cwd: str = "", stdin: bytes = b"",
                   keep_stdin_open: bool = False, timeout_s: float | None = None,
                   pass_fds: dict[int, int] | None = None, session_id: str = "",
                   stdout_mode: str = "text", stderr_mode: str = "text",
                   lossless: bool = False, tty: tuple[int, int] | None = None,
                   wait_if_paused: bool = False, user: str = "") -> ExecHandle:
        """Start argv in the sandbox; output is read by the loop into two hubs.

        Args:
            tty: (rows, cols): run it on a pty of the sandbox's own devpts; everything it
                writes comes on stdout (stderr's hub ends at once), stdin is typed into it.
            stdout_mode, stderr_mode: the token core's mode for each output ("text" for a
                session's agent, "bytes" for Exec: byte-exact).
            lossless: hubs with flow control (bytes mode only): a command whose output no
                reader takes blocks in write(2) instead of losing it (runtime/streams.py).
            wait_if_paused: on a paused sandbox, wait for its resume instead of refusing.
            user: "uid[:gid]" or "name[:group]" of the sandbox's /etc; empty: the image's
                User, else root inside.
        """
        if self._shutting_down:
            raise Unavailable("the daemon is shutting down")
        t0 = self.metrics.clock()
        self.admission("exec")
        msb = self.get(caller, sandbox_id)
        if msb.sandbox.spec.image or user:  # as docker exec applies it (images.py)
            on_image = await self.run_blocking(exec_on_image, msb.sandbox, list(argv), env, cwd,
                                               user, tenant=caller.tenant)
            argv, env, cwd, ids = on_image.argv, on_image.env, on_image.cwd, on_image.user
        else:
            ids = None
        cwd = _check_exec_request(argv, env, cwd, stdin, tty)
        await self._until_running(msb, wait_if_paused)
        loop = asyncio.get_running_loop()
        exec_id = "exe-" + secrets.token_hex(6)
        # Audited before it runs (nothing may run unrecorded); the detail is bounded, so the
        # append cannot fail for the size of argv. The pid is in its exec.exit record.
        await self.audit.record(
            "exec.start", tenant=caller.tenant, peer=caller.peer, sandbox_id=msb.id,
            session_id=session_id,
            detail={"exec_id": exec_id, "argv": list(argv),
                    "policy_digest": msb.policy_digest, "stdin_bytes": len(stdin),
                    **({"tty": list(tty)} if tty is not None else {})},
        )
        process, (in_w, out_r, err_r) = await self._spawn_command(
            caller, msb, exec_id, session_id, argv, env=env, cwd=cwd, pass_fds=pass_fds,
            timeout_s=timeout_s, tty=tty, user=ids)
        journal = (CommandJournal.for_sandbox(msb.sandbox.runtime_dir, exec_id, output_window(
            self.limits.stream_log_bytes, self.limits.exec_replay_bytes, lossless)[0])
            if msb.kept else None)  # live restore: output windows on disk too
        stdout, stderr = (self._output_hub(mode, lossless, journal and journal.outputs[name])
                          for name, mode in (("stdout", stdout_mode), ("stderr", stderr_mode)))
        if tty is not None:
            # the pty master (two descriptors of it) replaces the stdin and stdout pipes;
            # stderr's pipe, never given to the command, ends at once
            os.close(out_r)
            os.close(in_w)
            out_r, in_w = os.dup(process.stdout.fileno()), os.dup(process.stdin.fileno())
            process.stdout.close()
            process.stdin.close()
            process.stdout = process.stdin = None
        stdout.attach_fd(out_r)
        stderr.attach_fd(err_r)
        writer = StdinWriter(in_w, loop)
        handle = ExecHandle(exec_id, msb.id, tuple(argv), process, stdout, stderr, writer,
                            time.monotonic(), pid=process.pid or 0, journal=journal)
        msb.execs[exec_id] = handle
        if stdin:
            writer.write(stdin)
        if not keep_stdin_open:
            writer.close()
        self._follow_exit(handle, loop)
        if msb.kept:  # it outlives a daemon restart (runtime/command_journal.py)
            keep_command(self.live_restore, msb, handle, journal, [out_r, err_r], lossless)
        self.metrics.exec_started(msb.spec.backend, t0)
        return handle

    async def _spawn_command(self, caller: Caller, msb: ManagedSandbox, exec_id: str,
                             session_id: str, argv: list[str], *, env, cwd: str, pass_fds,
                             timeout_s: float | None, tty: tuple[int, int] | None,
                             user: tuple[int, int] | None = None):
        """Start the command on a spawner thread with three new pipes; returns its Process
        and the daemon's ends (stdin's write end, stdout's and stderr's read ends).

        Raises:
            InvalidSpec: cwd cannot be entered inside the sandbox.
            CorralError: the spawn failed (also audited as exec.failed).
        """
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
        (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes
        try:
            process = await self.run_blocking(self.tracing.phase_in_thread(
                lambda: msb.sandbox.exec(
                    list(argv), env=env or None, cwd=cwd, stdin=in_r,
                    stdout=out_w, stderr=err_w, pass_fds=pass_fds,
                    timeout_s=timeout_s or None, **({"tty": tty} if tty else {}),
                    **({"user": user} if user else {}),
                ), "exec.spawn", backend=msb.spec.backend),
                tenant=caller.tenant,
            )
        except BaseException as exc:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            with contextlib.suppress(Exception):  # never hide why the spawn failed
                self.audit.submit("exec.failed", tenant=caller.tenant, peer=caller.peer,
                                  sandbox_id=msb.id, session_id=session_id,
                                  detail={"exec_id": exec_id, "error": str(exc) or repr(exc)})
            if isinstance(exc, SandboxSetupError) and exc.step == "chdir":
                # the caller's cwd, not the sandbox, is at fault
                raise InvalidSpec("cwd", f"{cwd!r} cannot be entered inside the sandbox: "
                                         f"{os.strerror(exc.errno)}") from None
            raise
        finally:
            for fd in (in_r, out_w, err_w):  # the command's ends
                os.close(fd)
        return process, (in_w, out_r, err_r)

    def _follow_exit(self, handle: ExecHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Have the loop hear of the command's exit (from the thread that reaps it), and
        end it at its deadline."""
        process = handle.process
        process.on_exit = lambda _p: loop.call_soon_threadsafe(self._on_exit, handle)
        if process.returncode is not None:  # it ended before on_exit was set
            self._on_exit(handle)
        if process.deadline is not None:
            loop.call_at(loop.time() + process.remaining(), self._expire, handle)

    def _output_hub(self, mode: str, lossless: bool, journal=None) -> StreamHub:
        """A hub for one output of a command. A lossless one holds the command back once
        a quarter of stream_log_bytes is unread, and keeps exec_replay_bytes of output
        already sent on top, for a client that drops and resumes (journal: live
        restore's copy of that window on disk)."""
        log_bytes, hold = output_window(self.limits.stream_log_bytes,
                                        self.limits.exec_replay_bytes, lossless)
        return output_hub(mode, log_bytes, hold, journal)

    def _expire(self, handle: ExecHandle) -> None:
        """End a command at its deadline; not while its sandbox is paused (resume times it
        again), nor early when a pause moved its deadline on."""
        if not handle.running:
            return
        msb = self._sandboxes.get(handle.sandbox_id)
        if msb is not None and msb.paused_at:
            return
        left = handle.process.remaining()
        if left:
            loop = asyncio.get_running_loop()
            loop.call_at(loop.time() + left, self._expire, handle)
            return
        handle.process.expire()

    def _on_exit(self, handle: ExecHandle) -> None:
        proc = handle.process
        if not handle.running or proc.returncode is None:
            return
        handle.returncode = proc.returncode
        handle.reason = str(proc.reason.value if proc.reason else "exited")
        handle.duration_s = time.monotonic() - handle.started_at
        handle.exited.set()
        # The command is gone: its stdin's write end goes now (kept open, as for every
        # session's agent, it leaked one descriptor per command), and the process forgets
        # this handle (handle -> process -> on_exit -> handle was a reference cycle).
        proc.on_exit = None
        if handle.stdin is not None:
            handle.stdin.abort()
        msb = self._sandboxes.get(handle.sandbox_id)
        if msb is not None:
            if msb.kept:  # its exit is written before a retire can drop its journal
                self.live_restore.forget_command(msb.id, handle.id, handle.journal, (
                    handle.returncode, handle.reason, handle.duration_s))
            for retired in _retire_finished(msb.execs):
                if retired.journal is not None and self.live_restore is not None:
                    self.live_restore.drop_journal(retired.journal)
        self.audit.append(
            {"oom": "exec.oom", "timeout": "exec.timeout"}.get(handle.reason, "exec.exit"),
            tenant=msb.tenant if msb else "", peer="daemon", sandbox_id=handle.sandbox_id,
            detail={"exec_id": handle.id, "pid": handle.pid, "returncode": handle.returncode,
                    "reason": handle.reason, "duration_s": round(handle.duration_s, 6)},
        )

    def get_exec(self, caller: Caller, sandbox_id: str, exec_id: str) -> ExecHandle:
        msb = self.get(caller, sandbox_id)
        handle = msb.execs.get(exec_id)
        if handle is None:
            raise NotFound(f"exec {exec_id!r} does not exist in sandbox {sandbox_id!r}")
        return handle

    async def send_input(self, caller: Caller, sandbox_id: str, exec_id: str, data: bytes,
                   close: bool) -> None:
        handle = self.get_exec(caller, sandbox_id, exec_id)
        if len(data) > MAX_INPUT_BYTES:
            raise InvalidSpec("data", f"{len(data)} bytes is over the {MAX_INPUT_BYTES} limit")
        if handle.stdin is None or handle.stdin.closed:
            raise Ended(f"stdin of {exec_id} is closed")
        if data:
            handle.stdin.write(data)
        if close:
            handle.stdin.close()
        await self.audit.record("exec.input", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id,
                                detail={"exec_id": exec_id, "bytes": len(data), "close": close})

    def resize(self, caller: Caller, sandbox_id: str, exec_id: str, rows: int,
               cols: int) -> None:
        """Set the window of a command started with a tty.

        Raises:
            NotFound: no such exec. InvalidSpec: a size out of range, or no tty.
            Ended: the command has ended.
        """
        handle = self.get_exec(caller, sandbox_id, exec_id)
        ptys.check_window(rows, cols)
        if not handle.running:
            raise Ended(f"{exec_id} has ended; its terminal is gone")
        resize = getattr(handle.process, "resize", None)
        if resize is None:
            raise InvalidSpec("tty", f"{exec_id} was not started with a tty")
        try:
            resize(rows, cols)
        except InvalidSpec:
            raise
        except (CorralError, OSError):
            raise Ended(f"{exec_id} has ended; its terminal is gone") from None

    async def signal(self, caller: Caller, sandbox_id: str, exec_id: str, sig: int) -> int:
        msb = self.get(caller, sandbox_id)
        if not 1 <= sig <= 64:
            raise InvalidSpec("signal", f"{sig} is not a signal number (1-64)")
        if exec_id:
            handle = self.get_exec(caller, sandbox_id, exec_id)
            delivered = 0
            if handle.running and handle.process.pid:
                delivered = int(signal_command(handle.process, sig))
        else:
            delivered = msb.sandbox.signal(sig)
        await self.audit.record("sandbox.signal", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id,
                                detail={"exec_id": exec_id, "signal": sig, "delivered": delivered})
        return delivered

    # -- files --------------------------------------------------------------------------------

    async def write_file(self, caller: Caller, sandbox_id: str, path: str, content: bytes,
                         mode: int) -> int:
        msb = self.get(caller, sandbox_id)
        size = await asyncio.get_running_loop().run_in_executor(
            None, msb.workspace.write, path, content, mode or 0o644)
        await self.audit.record("file.write", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id, detail={"path": path, "bytes": size})
        return size

    async def read_file(self, caller: Caller, sandbox_id: str, path: str,
                        max_bytes: int) -> tuple[bytes, bool]:
        msb = self.get(caller, sandbox_id)
        if max_bytes > MAX_READ_BYTES:  # refused, never quietly capped
            raise InvalidSpec("max_bytes", f"{max_bytes} is over the maximum of "
                                           f"{MAX_READ_BYTES} bytes (4 MiB) one ReadFile returns")
        data, truncated = await asyncio.get_running_loop().run_in_executor(
            None, msb.workspace.read, path, max_bytes)
        await self.audit.record("file.read", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id, detail={"path": path, "bytes": len(data)})
        return data, truncated

    async def list_files(self, caller: Caller, sandbox_id: str, path: str):
        msb = self.get(caller, sandbox_id)
        entries = await asyncio.get_running_loop().run_in_executor(
            None, msb.workspace.list, path or ".")
        await self.audit.record("file.list", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id, detail={"path": path or "."})
        return entries

    # Files of any size, trees and watches (sandbox/workspace.py, archive.py,
    # workspace_watch.py). Kernel file work runs on the default executor, a chunk at a time;
    # nothing is held between chunks but the chunk in hand.

    #: Watch streams the daemon runs at once: each is an inotify instance on the daemon's
    #: own (root's) quota, shared with the host.
    MAX_FILE_WATCHES = 16
    #: ... and one tenant at most this many of them, so that one cannot take every turn.
    MAX_FILE_WATCHES_PER_TENANT = 4
    _file_watches = 0

    async def _file_audit(self, record: str, caller: Caller, sandbox_id: str, **detail) -> None:
        await self.audit.record(record, tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id, detail=detail)

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def stat_file(self, caller: Caller, sandbox_id: str, path: str):
        msb = self.get(caller, sandbox_id)
        info = await self._in_thread(msb.workspace.stat, path or ".")
        await self._file_audit("file.stat", caller, sandbox_id, path=path or ".")
        return info

    async def make_dir(self, caller: Caller, sandbox_id: str, path: str, mode: int,
                       parents: bool) -> int:
        msb = self.get(caller, sandbox_id)
        made = await self._in_thread(msb.workspace.mkdir, path, mode or 0o755, parents)
        await self._file_audit("file.mkdir", caller, sandbox_id, path=path, parents=parents,
                               created=made)
        return made

    async def remove_file(self, caller: Caller, sandbox_id: str, path: str,
                          recursive: bool) -> str:
        msb = self.get(caller, sandbox_id)
        kind = await self._in_thread(msb.workspace.remove, path, recursive)
        await self._file_audit("file.remove", caller, sandbox_id, path=path, recursive=recursive,
                               kind=kind)
        return kind

    async def rename_file(self, caller: Caller, sandbox_id: str, src: str, dst: str,
                          no_replace: bool) -> None:
        msb = self.get(caller, sandbox_id)
        await self._in_thread(msb.workspace.rename, src, dst, no_replace)
        await self._file_audit("file.rename", caller, sandbox_id, from_path=src, to_path=dst,
                               no_replace=no_replace)

    async def upload(self, caller: Caller, sandbox_id: str, path: str, *, mode: int,
                     offset: int, sha256: str, parts) -> tuple[int, str, int]:
        """Write a file from `parts`, an async iterator of ("chunk", offset, data) and
        ("end", size); (size, sha256 of the whole file, bytes received)."""
        from corral.sandbox.workspace import DigestMismatch

        msb = self.get(caller, sandbox_id)
        if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise InvalidSpec("start.sha256", "is not 64 lowercase hex digits")
        upload = await self._in_thread(msb.workspace.upload, path, offset, mode)
        size, digest, complete = upload.pos, "", False
        loop = asyncio.get_running_loop()
        writing = None  # the chunk being written (and hashed) while the next one arrives
        try:
            end_size = 0
            async for part in parts:
                if part[0] == "end":
                    end_size = part[1]
                    break
                if writing is not None:
                    await writing
                writing = loop.run_in_executor(None, upload.write, part[2], part[1])
            if writing is not None:
                await writing
            size, digest = await self._in_thread(upload.finish, end_size)
            complete = True
        finally:
            upload.close()  # waits for a write still running on the executor
            await self._file_audit("file.upload", caller, sandbox_id, path=path, offset=offset,
                                   bytes=upload.received, size=size, sha256=digest,
                                   complete=complete)
        if sha256 and digest != sha256:
            raise DigestMismatch(f"sha256: the file has {digest}, not {sha256} as the client "
                                 f"said; upload it again")
        return size, digest, upload.received

    async def download(self, caller: Caller, sandbox_id: str, path: str, offset: int,
                       length: int):
        """Async iterator of ("stat", FileStat), ("chunk", offset, data), ("end", size,
        sha256) (sandbox/workspace.py Workspace.download)."""
        msb = self.get(caller, sandbox_id)
        parts = msb.workspace.download(path, offset, length)
        first = await self._in_thread(next, parts)  # refusals come before the audit record
        await self._file_audit("file.download", caller, sandbox_id, path=path, offset=offset,
                               length=length)
        return self._drain(parts, first)

    async def _drain(self, parts, first=None):
        """Items of a blocking iterator, each next one read on the executor while the
        current one is being sent; the iterator is closed at the end or on cancel."""
        loop = asyncio.get_running_loop()
        ahead = None
        try:
            if first is not None:
                yield first
            ahead = loop.run_in_executor(None, next, parts, None)
            while True:
                item = await ahead
                if item is None:
                    return
                ahead = loop.run_in_executor(None, next, parts, None)
                yield item
        finally:
            # A next() still running (cancelled meanwhile) makes close() raise: the
            # iterator then closes its descriptors itself when it is collected.
            with contextlib.suppress(ValueError):
                parts.close()

    def _workspace_caps(self, msb: ManagedSandbox) -> tuple[int, int]:
        """(bytes, entries) one archive may bring: the workspace's size and inode caps."""
        from corral.sandbox import workspace_fs

        cap_bytes, cap_inodes = workspace_fs.max_bytes(), workspace_fs.max_inodes()
        with contextlib.suppress(OSError):
            vfs = os.statvfs(msb.workspace.root)
            if vfs.f_files:
                cap_inodes = min(cap_inodes, vfs.f_files)
            cap_bytes = min(cap_bytes, vfs.f_blocks * vfs.f_frsize)
        return cap_bytes, cap_inodes

    async def put_archive(self, caller: Caller, sandbox_id: str, path: str, chunks):
        """Extract a tar stream (an async iterator of bytes) beneath the directory path."""
        msb = self.get(caller, sandbox_id)
        cap_bytes, cap_entries = self._workspace_caps(msb)
        extractor = await self._in_thread(
            lambda: msb.workspace.put_archive(path or ".", max_bytes=cap_bytes,
                                              max_entries=cap_entries))
        report, error = None, ""
        try:
            async for data in chunks:
                await self._in_thread(extractor.feed, data)
            report = await self._in_thread(extractor.finish)
            return report
        except Exception as exc:
            error = str(exc)[:200]
            raise
        finally:
            extractor.close()
            r = report or extractor.report
            await self._file_audit("archive.put", caller, sandbox_id, path=path or ".",
                                   files=r.files, dirs=r.dirs, symlinks=r.symlinks,
                                   hardlinks=r.hardlinks, bytes=r.bytes, skipped=r.skipped,
                                   error=error)

    async def get_archive(self, caller: Caller, sandbox_id: str, path: str):
        """(FileStat of path, async iterator of tar bytes)."""
        msb = self.get(caller, sandbox_id)
        info, chunks = await self._in_thread(msb.workspace.archive, path or ".")
        await self._file_audit("archive.get", caller, sandbox_id, path=path or ".", kind=info.kind)

        return info, self._drain(chunks)

    async def watch_files(self, caller: Caller, sandbox_id: str, path: str):
        """Async iterator of lists of WatchEvent (sandbox/workspace_watch.py); the first list
        is one "watching" event. Ends when the directory goes away or the sandbox does."""
        from corral.sandbox.workspace_watch import TreeWatch, WatchEvent

        msb = self.get(caller, sandbox_id)
        if not hasattr(self, "_watches_by_tenant"):
            self._watches_by_tenant: dict[str, int] = {}
        mine = self._watches_by_tenant.get(caller.tenant, 0)
        if mine >= self.MAX_FILE_WATCHES_PER_TENANT:
            raise ResourceExhausted(f"tenant {caller.tenant!r} already runs "
                                    f"{self.MAX_FILE_WATCHES_PER_TENANT} file watches; end "
                                    f"one first")
        if self._file_watches >= self.MAX_FILE_WATCHES:
            raise ResourceExhausted(f"the daemon already runs {self.MAX_FILE_WATCHES} file "
                                    f"watches; end one first")
        self._file_watches += 1
        self._watches_by_tenant[caller.tenant] = mine + 1
        try:
            watch = await self._in_thread(TreeWatch, msb.workspace, path or ".")
        except BaseException:
            self._watch_ended(caller.tenant)
            raise
        await self._file_audit("file.watch", caller, sandbox_id, path=path or ".",
                               watched_dirs=watch.watched_dirs)
        return self._watch_stream(msb, watch, WatchEvent, caller.tenant)

    def _watch_ended(self, tenant: str) -> None:
        self._file_watches -= 1
        left = self._watches_by_tenant.get(tenant, 1) - 1
        if left:
            self._watches_by_tenant[tenant] = left
        else:
            self._watches_by_tenant.pop(tenant, None)

    async def _watch_stream(self, msb: ManagedSandbox, watch, event_cls, tenant: str):
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def readable() -> None:
            try:
                if watch.read():
                    ready.set()
            except OSError:
                watch.ended = True
            if watch.dropped or watch.ended:
                ready.set()

        loop.add_reader(watch.fileno(), readable)
        try:
            first = [event_cls(watch.root, "watching", True, 0, watch.watched_dirs)]
            if watch.limited:
                first.append(event_cls(watch.root, "limit", True, 0, watch.limited))
            yield first
            while True:
                events = watch.take()
                if events:
                    yield events
                    continue
                if watch.ended or msb.destroyed:
                    return
                ready.clear()
                await ready.wait()
        finally:
            loop.remove_reader(watch.fileno())
            watch.close()
            self._watch_ended(tenant)


def _retire_finished(execs: dict[str, ExecHandle]) -> list[ExecHandle]:
    """Forget the oldest finished commands past MAX_FINISHED_EXECS, or past
    MAX_FINISHED_OUTPUT_BYTES of replay log together (the newest one always stays).

    A long-lived sandbox runs any number of commands; each finished one kept its handle
    (argv, output hubs) for ever, so memory and the size of a Get/List answer grew without
    bound (a tenant's 300 KB argvs made ListSandboxes pass the 16 MiB message limit). A
    client attached to a retired command keeps its stream; a new Attach gets NOT_FOUND.
    """
    finished = [k for k, h in execs.items() if not h.running]
    kept, keep = 0, 0  # newest first: how many stay within both bounds
    for exec_id in reversed(finished):
        handle = execs[exec_id]
        kept += (handle.stdout.stream.statistics().log_bytes
                 + handle.stderr.stream.statistics().log_bytes)
        if keep == MAX_FINISHED_EXECS or (keep and kept > MAX_FINISHED_OUTPUT_BYTES):
            break
        keep += 1
    retired = [execs.pop(exec_id) for exec_id in finished[:len(finished) - keep]]
    for handle in retired:
        # no new reader can come: output it still holds back is read to EOF (and its pipe
        # closed) for the readers it has, instead of waiting for one for ever
        handle.stdout.release_flow_control()
        handle.stderr.release_flow_control()
    return retired


def _check_exec_request(argv: list[str], env: dict[str, str] | None, cwd: str, stdin: bytes,
                        tty: tuple[int, int] | None) -> str:
    """Refuse a malformed command before anything is audited or spawned; returns the
    working directory as an absolute path."""
    check_argv(argv)
    check_env((env or {}).items())
    cwd = _check_cwd(cwd)
    if len(stdin) > MAX_INPUT_BYTES:
        raise InvalidSpec("stdin", f"{len(stdin)} bytes is over the {MAX_INPUT_BYTES} limit")
    if tty is not None:
        ptys.check_window(*tty)
    return cwd


def _check_cwd(cwd: str) -> str:
    """The working directory as an absolute path; a relative one is under /workspace."""
    if "\0" in cwd:
        raise InvalidSpec("cwd", "contains a NUL byte")
    if len(cwd) > 4096:
        raise InvalidSpec("cwd", "longer than 4096 bytes")
    return posixpath.join("/workspace", cwd) if cwd else "/workspace"
