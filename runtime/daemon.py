"""`corral daemon`: the grpc.aio server that owns sandboxes, sessions and the audit log.

This is the composition root: the one module that builds every part (audit log,
governance, sandbox manager, sessions, scheduler, servicers, server) and wires them to
each other. No other product module builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time

import grpc

from corral.sandbox import cgroup_pool, cgroup_tuning, namespace_pool, workspace_fs
from corral.sandbox.backends.base import SWEPT_LISTENERS
from corral.sandbox.backends.native import sweep_for_this_process
from corral.sandbox.errors import CorralError
from corral.v1 import audit_pb2, image_pb2, sandbox_pb2, session_pb2, snapshot_pb2, task_pb2

from .api.audit import AuditServicer
from .api.errors import exhaustion_listeners
from .api.images import ImagesServicer
from .api.sandboxes import SandboxesServicer
from .api.sessions import SessionsServicer
from .api.snapshots import SnapshotsServicer
from .api.tasks import task_handlers
from .api.wire import MAX_MESSAGE_BYTES, generic_handler
from .audit import AuditLog
from .auth import Authenticator
from .config import DaemonConfig
from .governance import Governance
from .images import ImageService
from .loop import GcPauses, LatencyGc, loop_factory
from .metrics import NO_METRICS
from .resources import ResourceGuard
from .sandboxes import SandboxLimits, SandboxManager
from .sessions import SessionManager
from .snapshots import SandboxState
from .tracing import NO_TRACING

log = logging.getLogger("corral.daemon")

SHUTDOWN_GRACE_S = 5.0
#: Longest a stop may take before the process exits anyway (status 1).
STOP_DEADLINE_S = 25.0


class Daemon:
    """One daemon: start() binds and serves, stop() ends everything and leaves nothing behind."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.audit: AuditLog | None = None
        #: Signed checkpoints, audit sinks, the policy digest and its reloads.
        self.governance: Governance | None = None
        self.auth = Authenticator(config.tokens, config.operators)
        #: Every tenant's operator policy: limits, profiles, egress rules and quotas.
        self.policies = config.policy_book()
        self.sandboxes: SandboxManager | None = None
        self.sessions: SessionManager | None = None
        self.pools = None  # warm pools of [pools.NAME] (runtime/pools.py WarmPools)
        self.state: SandboxState | None = None  # snapshots and change sets (runtime/snapshots.py)
        self.images: ImageService | None = None  # the image store's service (runtime/images.py)
        self.scheduler = None  # corral.runtime.tasks.scheduler.Scheduler
        self.server: grpc.aio.Server | None = None
        self.tcp_port: int | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.resources: ResourceGuard | None = None
        self._serving = True  # as health says
        self._check_wanted = asyncio.Event()
        self._monitor: asyncio.Task | None = None
        #: Steps of stop() that failed (each logged; the process still exits).
        self.stop_failures: list[str] = []
        #: When this daemon is its process (`corral daemon`): end the process if a stop
        #: takes longer than this. None in a process that embeds a Daemon (tests).
        self.exit_deadline_s: float | None = None
        #: Prometheus metrics (runtime/metrics.py); NO_METRICS when off.
        self.metrics = NO_METRICS
        #: OpenTelemetry spans (runtime/tracing.py); NO_TRACING when off.
        self.tracing = NO_TRACING
        #: The collector's pauses, and the "latency" policy once started (runtime/loop.py).
        self.gc_pauses: GcPauses | None = None
        self.gc: LatencyGc | None = None
        #: "uvloop" or "asyncio": the loop serve_forever runs on.
        self.loop_name = ""
        #: Live restore (runtime/restore.py) when cfg.live_restore; what start recovered.
        self.live_restore = None
        self._recovered: list = []
        self._restored = 0
        #: (backend, sandbox id, engine) swept before the audit log opened (_on_swept).
        self._swept_early: list[tuple[str, str, str]] = []

    async def start(self) -> None:
        """Build and wire every part, in dependency order, then serve."""
        cfg = self.config
        _raise_descriptor_limit()
        os.makedirs(cfg.state, mode=0o700, exist_ok=True)
        self._start_observability()
        _configure_workspaces(cfg)
        cgroup_tuning.configure(cfg.cgroup_favordynmods)
        favordynmods = cgroup_tuning.ensure()  # before any sandbox joins a cgroup
        cgroup_pool.enable(cfg.cgroup_pool_size)
        namespace_pool.enable(cfg.namespace_pool_size)
        # Every backend's sweep (live restore's adoption below, docker's first start on an
        # engine) goes into the chain as sandbox.reaped, as the native sweep's does.
        SWEPT_LISTENERS.append(self._on_swept)
        await self._recover_kept()  # before the sweeps: what they keep is re-owned
        _sweep_workspaces()
        await self._open_records()
        self._start_sandboxes_and_sessions()
        from .tasks.service import start_scheduler

        self.scheduler = await start_scheduler(cfg, self.audit, self.policies)
        self.scheduler.admission = self.resources.admit
        self.scheduler.metrics = self.metrics
        self.sessions.attach_scheduler(self.scheduler, cfg.max_delegations_per_session)
        await self._start_server()
        self.audit.append("daemon.start", tenant="", peer="daemon", detail={
            "pid": os.getpid(), "socket": cfg.socket, "listen": cfg.listen or "",
            "tcp_port": self.tcp_port or 0, "metrics_port": self.metrics.port,
            "cgroup_favordynmods": favordynmods, "event_loop": _loop_name(),
            "gc_policy": cfg.gc_policy,
            **({"live_restore": True, "restored": self._restored} if self.live_restore else {}),
            **self.governance.start_detail()})
        tcp = f" and {cfg.listen.rpartition(':')[0]}:{self.tcp_port}" if cfg.listen else ""
        log.info("corral daemon listening on unix:%s%s", cfg.socket, tcp)
        await self._apply_health()  # NOT_SERVING from the start on a full disk
        self._monitor = asyncio.get_running_loop().create_task(self._watch_resources())
        exhaustion_listeners.append(self._on_exhaustion)
        if cfg.gc_policy == "latency":  # last: what start-up made is frozen
            self.gc = LatencyGc()
            self.gc.start(asyncio.get_running_loop())

    async def _recover_kept(self) -> None:
        """Live restore on: adopt the sandboxes a previous daemon kept (the manager holds
        them once built); off: kill what one left held, so the sweep removes it."""
        from . import restore

        loop = asyncio.get_running_loop()
        if not self.config.live_restore:
            killed = await loop.run_in_executor(None, restore.discard, self.config.state)
            if killed:
                log.info("live restore is off: killed %d sandboxes a daemon kept", killed)
            return
        self.live_restore = await loop.run_in_executor(
            None, restore.LiveRestore, self.config.state)
        self._recovered = await loop.run_in_executor(None, self.live_restore.recover)

    def _start_observability(self) -> None:
        """Metrics and tracing, when configured (only then are their libraries imported)."""
        cfg = self.config
        if cfg.metrics is not None:
            from .metrics import DaemonMetrics

            self.metrics = DaemonMetrics(self, cfg.metrics, cfg.metrics_public)
        if cfg.tracing is not None:
            from .tracing import Tracing

            self.tracing = Tracing(cfg.tracing)

    async def _open_records(self) -> None:
        """The disk guard, the audit log, governance; then what a dead daemon's sandboxes
        left is removed and recorded."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        # On a full state disk the reserve is released here, so the audit log still opens.
        self.resources = ResourceGuard(
            cfg.state, reserve_bytes=cfg.disk_reserve_bytes,
            extra_paths=(workspace_fs.root(),) if workspace_fs.kind() == "dir" else ())
        self.resources.check()
        # verify_audit="full" re-hashes every segment before anything is appended.
        self.audit = await loop.run_in_executor(None, lambda: AuditLog.open(
            os.path.join(cfg.state, "audit.db"), verify=cfg.verify_audit,
            segment_records=cfg.audit_segment_records, segment_bytes=cfg.audit_segment_bytes,
            retention_s=cfg.audit_retention_s))
        self.audit.metrics = self.metrics
        # The signing key, the policy digest on every record from here on, the sinks.
        self.governance = Governance(self)
        await loop.run_in_executor(None, self.governance.start)
        # Sandboxes of a daemon that died (SIGKILL, crash) died with it; remove what they
        # left and say so in the chain, which simply continues. (The sweep also stands for
        # the one this process's first sandbox start would make: a sweep there can fail a
        # caller's Create for a sandbox that is not theirs.)
        for sandbox_id in await loop.run_in_executor(None, _sweep):
            self.audit.append("sandbox.reaped", tenant="", peer="daemon", sandbox_id=sandbox_id,
                              detail={"reason": "its daemon died"})
        for backend, sandbox_id, where in self._swept_early:  # live restore's, just before
            self._record_swept(backend, sandbox_id, where, wait=True)
        self._swept_early = []

    def _on_swept(self, backend: str, sandbox_ids: list[str], where: str) -> None:
        """A backend's sweep removed sandbox_ids (any thread): sandbox.reaped for each, or,
        before the audit log is open (live restore's recovery), once it is."""
        for sandbox_id in sandbox_ids:
            if self.audit is None:
                self._swept_early.append((backend, sandbox_id, where))
            else:
                self._record_swept(backend, sandbox_id, where, wait=False)

    def _record_swept(self, backend: str, sandbox_id: str, where: str, *, wait: bool) -> None:
        record = self.audit.append if wait else self.audit.submit_background
        record("sandbox.reaped", tenant="", peer="daemon", sandbox_id=sandbox_id,
               detail={"reason": "its daemon died", "backend": backend,
                       **({"engine": where} if where else {})})

    def _start_sandboxes_and_sessions(self) -> None:
        cfg = self.config
        self.sandboxes = SandboxManager(self.audit, SandboxLimits(
            default_ttl_s=cfg.sandbox_ttl_s, paused_ttl_s=cfg.paused_ttl_s,
            max_sandboxes=cfg.max_sandboxes, stream_log_bytes=cfg.stream_log_bytes,
            exec_replay_bytes=cfg.exec_replay_bytes), policies=self.policies)
        self.sandboxes.admission = self.resources.admit
        self.sandboxes.secrets = cfg.secret_store()
        self.sandboxes.metrics = self.metrics
        self.sandboxes.tracing = self.tracing
        recovered, self._recovered = self._recovered, []
        if self.live_restore is not None:
            self.sandboxes.live_restore = self.live_restore
            self._restored = self.sandboxes.restore(recovered)
        self.sandboxes.start()
        pools = cfg.warm_pools()
        if pools:
            from .pools import WarmPools

            self.pools = WarmPools(self.sandboxes, pools, cfg.pool_refill_per_s, self.audit)
            self.sandboxes.pools = self.pools
            self.pools.start()
        self.sessions = SessionManager(self.sandboxes, self.audit,
                                       idle_ttl_s=cfg.session_idle_ttl_s,
                                       stream_log_bytes=cfg.stream_log_bytes)
        self.sessions.metrics = self.metrics
        if self.live_restore is not None:  # after their sandboxes and agents' commands
            self.sessions.live_restore = self.live_restore
            self.sessions.restore(recovered)
        self.sessions.start()
        self.state = _sandbox_state(cfg, self.sandboxes, self.audit)
        self.images = ImageService(self.audit, max_bytes=cfg.image_store_max_bytes)
        self.images.start()

    async def _start_server(self) -> None:
        """The gRPC server with every servicer, bound to the socket (and TCP, metrics)."""
        cfg = self.config
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        sandboxes_desc = sandbox_pb2.DESCRIPTOR.services_by_name["Sandboxes"]
        sessions_desc = session_pb2.DESCRIPTOR.services_by_name["Sessions"]
        audit_desc = audit_pb2.DESCRIPTOR.services_by_name["Audit"]
        snapshots_desc = snapshot_pb2.DESCRIPTOR.services_by_name["Snapshots"]
        images_desc = image_pb2.DESCRIPTOR.services_by_name["Images"]
        server.add_generic_rpc_handlers((
            generic_handler(sandboxes_desc, SandboxesServicer(self),
                            streaming_bytes=frozenset({"Exec", "Attach", "Download",
                                                       "GetArchive", "List"})),
            generic_handler(sessions_desc, SessionsServicer(self),
                            streaming_bytes=frozenset({"Open", "OpenMany"})),
            generic_handler(audit_desc, AuditServicer(self)),
            generic_handler(snapshots_desc, SnapshotsServicer(self)),
            generic_handler(images_desc, ImagesServicer(self)),
            *task_handlers(self),
        ))
        await self._add_health_and_reflection(server, [
            sandboxes_desc, sessions_desc, audit_desc, snapshots_desc, images_desc,
            *task_pb2.DESCRIPTOR.services_by_name.values()])
        self._bind_unix(server)
        if cfg.listen:
            self.tcp_port = self._bind_tcp(server)
            from corral.sandbox.proxy import shared_proxy  # no sandbox may reach our port

            shared_proxy().protect(cfg.listen.rpartition(":")[0], self.tcp_port)
        if self.metrics.enabled:
            self.metrics.start()
            from corral.sandbox.proxy import shared_proxy

            shared_proxy().protect(self.metrics.host, self.metrics.port)  # not from inside
            shared_proxy().decision_listeners.append(self.metrics.egress_decision)
            log.info("corral daemon metrics on http://%s:%d/metrics", self.metrics.host,
                     self.metrics.port)
        await server.start()
        self.server = server

    # -- health from resources -------------------------------------------------------------------

    async def _watch_resources(self) -> None:
        """Every resource_check_s: free disk, inodes and descriptors -> admission and health."""
        while not self._stopping:
            self._check_wanted.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._check_wanted.wait(), self.config.resource_check_s)
            if self._stopping:
                return
            try:
                self.resources.check()
                await self._apply_health()
            except Exception:  # noqa: BLE001 - the monitor must outlive one bad look
                log.exception("resource check failed")

    def _on_exhaustion(self, _exc) -> None:
        """An RPC just ran out of something: look now, not at the next tick."""
        self._check_wanted.set()

    async def _apply_health(self) -> None:
        """Mutating services (and the overall "") NOT_SERVING while the guard refuses work."""
        from grpc_health.v1 import health_pb2

        serving = not self.resources.reason
        if serving == self._serving or self._stopping:
            return
        self._serving = serving
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self._mutating_health_names:
            await self.health.set(name, status)
        if serving:
            log.warning("health: SERVING again")
        else:
            log.error("health: NOT_SERVING (%s)", self.resources.reason)

    def statistics(self) -> dict:
        """Figures for metrics and operators: serving, why not, free disk and descriptors."""
        stats = dict(self.resources.statistics()) if self.resources is not None else {}
        stats["sandboxes"] = len(self.sandboxes.all()) if self.sandboxes is not None else 0
        stats["workspace_root"] = workspace_fs.root()
        stats["workspace_bytes"] = workspace_fs.max_bytes()
        stats["workspace_inodes"] = workspace_fs.max_inodes()
        stats["workspace_fs"] = workspace_fs.kind()
        if self.governance is not None:  # signing, sink lag, policy digest
            stats["audit"] = self.governance.statistics()
        stats["event_loop"] = self.loop_name
        if self.gc_pauses is not None:
            stats["gc"] = self.gc_pauses.statistics()
        return stats

    async def _add_health_and_reflection(self, server, descriptors) -> None:
        from grpc_health.v1 import health, health_pb2
        from grpc_reflection.v1alpha import reflection, reflection_pb2

        from .api import reflection as reflection_v1

        self.health = health.aio.HealthServicer()
        names = [d.full_name for d in descriptors]
        self._health_names = ["", *names]
        self._mutating_health_names = ["", *(n for n in names if n.rsplit(".", 1)[-1] in (
            "Sandboxes", "Sessions", "Tasks"))]
        for name in self._health_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        # Through generic_handler like ours: a request that does not decode is then
        # INVALID_ARGUMENT here too, not UNKNOWN with a Python class name.
        # Reflection v1 (what current tools ask for) beside v1alpha, one servicer behind both.
        v1 = reflection_v1.v1_service_descriptor()
        alpha = reflection.aio.ReflectionServicer(
            [*names, reflection_v1.V1_SERVICE, reflection.SERVICE_NAME, health.SERVICE_NAME])
        server.add_generic_rpc_handlers([
            generic_handler(health_pb2.DESCRIPTOR.services_by_name["Health"], self.health),
            generic_handler(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
                            alpha),
            generic_handler(v1, reflection_v1.V1Reflection(alpha, v1)),
        ])

    def _bind_unix(self, server) -> None:
        path = self.config.socket
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            if _socket_in_use(path):
                raise RuntimeError(f"another daemon is listening on {path}")
            os.unlink(path)
        old = os.umask(0o177)  # the socket is created 0600: only our own user connects
        try:
            if not server.add_insecure_port(f"unix:{path}"):
                raise RuntimeError(f"cannot listen on unix:{path}")
        finally:
            os.umask(old)

    def _bind_tcp(self, server) -> int:
        cfg = self.config
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
            with open(cfg.tls_cert, "rb") as f:
                cert = f.read()
            ca = None
            if cfg.tls_client_ca:
                with open(cfg.tls_client_ca, "rb") as f:
                    ca = f.read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                require_client_auth=ca is not None)
            port = server.add_secure_port(cfg.listen, creds)
        else:
            port = server.add_insecure_port(cfg.listen)
        if not port:
            raise RuntimeError(f"cannot listen on {cfg.listen}")
        return port

    async def stop(self, reason: str = "daemon-shutdown", cause: str = "") -> None:
        """Stop accepting, end sessions with a reason, destroy every sandbox.

        Every step runs even when an earlier one fails (a full disk fails the last audit
        append): failures are logged and kept in stop_failures, and the daemon is marked
        stopped whatever happened. With exit_deadline_s set (`corral daemon` sets
        STOP_DEADLINE_S), a watchdog ends the process if stopping takes longer (a step stuck
        in the kernel or on a lock).
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self.exit_deadline_s is not None:
            _start_stop_watchdog(self.exit_deadline_s)
        log.info("corral daemon stopping: %s%s", reason, f" ({cause})" if cause else "")
        try:
            await self._stop_steps(reason, cause)
        finally:
            self._stopped.set()

    async def _step(self, name: str, step) -> None:
        try:
            result = step()
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:  # noqa: BLE001 - keep stopping, say what failed
            self.stop_failures.append(f"{name}: {exc}")
            log.error("stopping: %s failed: %s", name, exc)

    async def _stop_steps(self, reason: str, cause: str) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        with contextlib.suppress(ValueError):
            SWEPT_LISTENERS.remove(self._on_swept)
        with contextlib.suppress(ValueError):
            exhaustion_listeners.remove(self._on_exhaustion)
        if self.server is not None:
            from grpc_health.v1 import health_pb2

            async def not_serving():
                for name in self._health_names:
                    await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

            await self._step("health", not_serving)
        # Refuse new sandboxes, commands and sessions (UNAVAILABLE), end the sessions, then
        # destroy the sandboxes, and only then stop the server: every open Exec and session
        # stream ends with its exited event instead of being cut off at the grace period.
        if self.sandboxes is not None:
            self.sandboxes.refuse_new()
        if self.scheduler is not None:  # stops placing; deep tasks keep running
            await self._step("scheduler", self.scheduler.stop)
        if self.sessions is not None:
            await self._step("sessions", lambda: self.sessions.shutdown(reason))
        if self.images is not None:  # no more timed collections (a pull's thread ends alone)
            await self._step("images", self.images.stop)
        if self.pools is not None:  # no more fills; the ready ones destroyed
            await self._step("pools", self.pools.stop)
        if self.sandboxes is not None:
            await self._step("sandboxes", lambda: self.sandboxes.shutdown(reason))
        # the cgroups they gave back, and the ready ones, are removed
        await self._step("cgroup pool", lambda: asyncio.to_thread(cgroup_pool.disable))
        # the ready pairs' descriptors closed, their id ranges given back
        await self._step("namespace pool", lambda: asyncio.to_thread(namespace_pool.disable))
        if self.live_restore is not None:  # the kept sandboxes' rows are written
            await self._step("live restore", lambda: asyncio.to_thread(
                self.live_restore.close))
        if self.server is not None:
            await self._step("server", lambda: self.server.stop(SHUTDOWN_GRACE_S))
        if self.audit is not None:
            if self.resources is not None:  # a full disk: the reserve makes room for it
                await self._step("disk check", self.resources.check)
            # counted denials go in before the last record
            await self._step("audit denials", self.audit.flush_denials)
            await self._step("audit daemon.stop", lambda: self.audit.append(
                "daemon.stop", tenant="", peer="daemon",
                detail={"reason": reason, "cause": cause, "pid": os.getpid(),
                        "failures": list(self.stop_failures)}))
            if self.governance is not None:  # the last checkpoint signs daemon.stop
                await self._step("audit evidence", lambda: asyncio.to_thread(
                    self.governance.stop))
            await self._step("audit close", self.audit.close)
        if self.metrics.enabled:
            from corral.sandbox.proxy import shared_proxy

            with contextlib.suppress(ValueError):
                shared_proxy().decision_listeners.remove(self.metrics.egress_decision)
            await self._step("metrics", self.metrics.stop)
        if self.tracing.enabled:  # the last spans leave (export is on the SDK's thread)
            await self._step("tracing", lambda: asyncio.to_thread(self.tracing.shutdown))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket)

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Sessions end with the documented reason "daemon-shutdown"; the signal that
            # asked for it goes to the log and the daemon.stop record.
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(
                self.stop("daemon-shutdown", cause=f"signal {signal.Signals(s).name}")))
        # SIGHUP: reload the tenant policy from policy_file (an audited, signed event).
        loop.add_signal_handler(signal.SIGHUP, lambda: self.governance is not None and (
            loop.run_in_executor(None, self.governance.reload_policy)))
        self.gc_pauses = GcPauses()
        self.loop_name = _loop_name()
        try:
            await self.start()
            await self._stopped.wait()
        finally:
            if self.gc is not None:
                self.gc.stop()
            self.gc_pauses.close()


def _start_stop_watchdog(deadline_s: float) -> None:
    """End the process if stopping has not ended it within deadline_s (any stop path)."""

    def expire():
        log.error("corral daemon did not stop within %.0fs; exiting now", deadline_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(deadline_s, expire)
    timer.daemon = True
    timer.start()


def _raise_descriptor_limit() -> None:
    """Every sandbox, command and session holds a few descriptors here: take the hard
    limit, not the usual soft 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _configure_workspaces(cfg: DaemonConfig) -> None:
    """Workspaces: capped tmpfs mounts under a 0700 root, settings inherited by the task
    shims through the environment."""
    workspace_fs.configure(root_dir=cfg.workspace_root, size_bytes=cfg.workspace_bytes,
                           inodes=cfg.workspace_inodes)
    workspace_fs.ensure_root()


def _sweep_workspaces() -> None:
    """Those of dead owners (a killed daemon's sandboxes, lost attempts) go first, before
    anything is written (live restore re-owned those of the sandboxes it adopted)."""
    for name in workspace_fs.sweep():
        log.info("removed workspace %s: its owner is gone", name)


def _sandbox_state(cfg: DaemonConfig, sandboxes: SandboxManager, audit) -> SandboxState:
    """Snapshots and copy-on-write change sets under the state directory (the backends and
    task shims find them through the environment, as they find workspaces); what a crashed
    daemon left half made goes first."""
    snapshot_root = os.path.join(cfg.state, "snapshots")
    changes_root = os.path.join(cfg.state, "changes")
    os.environ["CORRAL_SNAPSHOT_ROOT"] = snapshot_root
    os.environ["CORRAL_CHANGES_ROOT"] = changes_root
    state = SandboxState(sandboxes, audit, snapshot_root=snapshot_root,
                         changes_root=changes_root)
    state.sweep()
    return state


def _sweep() -> list[str]:
    """sweep_for_this_process(), retried when a sandbox of another live process vanishes
    while it looks.

    sweep() lists the runtime directory and then stats each entry; a concurrent destroy
    (another daemon, `corral run`) can remove one in between (FileNotFoundError).
    """
    for attempt in range(5):
        try:
            return sweep_for_this_process()
        except FileNotFoundError:
            if attempt == 4:
                raise
            time.sleep(0.05)
    return []


def _loop_name() -> str:
    """"uvloop" or "asyncio": the package of the running loop's class."""
    try:
        return type(asyncio.get_running_loop()).__module__.partition(".")[0]
    except RuntimeError:
        return ""


def _socket_in_use(path: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def run(config: DaemonConfig) -> int:
    from .logs import configure

    configure(config.log_format)
    started = time.monotonic()
    daemon = Daemon(config)
    daemon.exit_deadline_s = STOP_DEADLINE_S  # this process is the daemon: stops end it
    try:
        factory, _ = loop_factory(config.event_loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(daemon.serve_forever())
    except (RuntimeError, CorralError) as exc:  # e.g. AuditTampered: refuse, say why
        log.error("%s", exc)
        return 1
    if daemon.stop_failures:
        log.error("corral daemon stopped after %.1fs with failures: %s",
                  time.monotonic() - started, "; ".join(daemon.stop_failures))
        return 1
    log.info("corral daemon stopped after %.1fs", time.monotonic() - started)
    return 0
