"""`corral daemon`: the grpc.aio server that owns sandboxes, sessions and the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import grpc

from corral.sandbox import Sandbox, sweep
from corral.sandbox.errors import CorralError
from corral.v1 import audit_pb2, sandbox_pb2, session_pb2, task_pb2

from .api.audit import AuditServicer
from .api.sandboxes import SandboxesServicer
from .api.sessions import SessionsServicer
from .api.tasks import task_handlers
from .api.wire import generic_handler
from .audit import AuditLog
from .auth import Authenticator
from .config import DaemonConfig
from .sandboxes import SandboxManager
from .sessions import SessionManager

log = logging.getLogger("corral.daemon")

SHUTDOWN_GRACE_S = 5.0
MAX_MESSAGE_BYTES = 16 << 20


class Daemon:
    """One daemon: start() binds and serves, stop() ends everything and leaves nothing behind."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.audit: AuditLog | None = None
        self.auth = Authenticator(config.tokens, config.operators)
        #: Every tenant's operator policy: limits, profiles, egress rules and quotas.
        self.policies = config.policy_book()
        self.sandboxes: SandboxManager | None = None
        self.sessions: SessionManager | None = None
        self.scheduler = None  # corral.runtime.tasks.scheduler.Scheduler
        self.server: grpc.aio.Server | None = None
        self.tcp_port: int | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        cfg = self.config
        # Every sandbox, command and session holds a few descriptors here: take the hard
        # limit, not the usual soft 1024.
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.makedirs(cfg.state, mode=0o700, exist_ok=True)
        self.audit = AuditLog.open(os.path.join(cfg.state, "audit.db"))
        # Sandboxes of a daemon that died (SIGKILL, crash) died with it; remove what they
        # left and say so in the chain, which simply continues.
        for sandbox_id in await asyncio.get_running_loop().run_in_executor(None, _sweep):
            self.audit.append("sandbox.reaped", tenant="", peer="daemon", sandbox_id=sandbox_id,
                              detail={"reason": "its daemon died"})
        # Swept just now: the first Sandbox.start of this process need not sweep again (a
        # sweep there can fail a caller's Create for a sandbox that is not theirs).
        Sandbox._swept = True
        self.sandboxes = SandboxManager(
            self.audit, default_ttl_s=cfg.sandbox_ttl_s, max_sandboxes=cfg.max_sandboxes,
            stream_log_bytes=cfg.stream_log_bytes, policies=self.policies,
        )
        self.sandboxes.start()
        self.sessions = SessionManager(self.sandboxes, self.audit,
                                       idle_ttl_s=cfg.session_idle_ttl_s,
                                       stream_log_bytes=cfg.stream_log_bytes)
        self.sessions.start()
        from .tasks.service import start_scheduler

        self.scheduler = await start_scheduler(cfg, self.audit, self.policies)

        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        sandboxes_desc = sandbox_pb2.DESCRIPTOR.services_by_name["Sandboxes"]
        sessions_desc = session_pb2.DESCRIPTOR.services_by_name["Sessions"]
        audit_desc = audit_pb2.DESCRIPTOR.services_by_name["Audit"]
        server.add_generic_rpc_handlers((
            generic_handler(sandboxes_desc, SandboxesServicer(self),
                            streaming_bytes=frozenset({"Exec", "Attach"})),
            generic_handler(sessions_desc, SessionsServicer(self),
                            streaming_bytes=frozenset({"Open", "OpenMany"})),
            generic_handler(audit_desc, AuditServicer(self)),
            *task_handlers(self),
        ))
        await self._add_health_and_reflection(server, [sandboxes_desc, sessions_desc, audit_desc,
                                                       *task_pb2.DESCRIPTOR.services_by_name.values()])
        self._bind_unix(server)
        if cfg.listen:
            self.tcp_port = self._bind_tcp(server)
            from corral.sandbox.proxy import shared_proxy  # no sandbox may reach our port

            shared_proxy().protect(cfg.listen.rpartition(":")[0], self.tcp_port)
        await server.start()
        self.server = server
        self.audit.append("daemon.start", tenant="", peer="daemon", detail={
            "pid": os.getpid(), "socket": cfg.socket, "listen": cfg.listen or "",
            "tcp_port": self.tcp_port or 0})
        tcp = f" and {cfg.listen.rpartition(':')[0]}:{self.tcp_port}" if cfg.listen else ""
        log.info("corral daemon listening on unix:%s%s", cfg.socket, tcp)

    async def _add_health_and_reflection(self, server, descriptors) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [d.full_name for d in descriptors]
        self._health_names = ["", *names]
        for name in self._health_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)

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
        """Stop accepting, end sessions with a reason, destroy every sandbox."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("corral daemon stopping: %s%s", reason, f" ({cause})" if cause else "")
        if self.server is not None:
            from grpc_health.v1 import health_pb2

            for name in self._health_names:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Refuse new sandboxes, commands and sessions (UNAVAILABLE), end the sessions, then
        # destroy the sandboxes, and only then stop the server: every open Exec and session
        # stream ends with its exited event instead of being cut off at the grace period.
        if self.sandboxes is not None:
            self.sandboxes.refuse_new()
        if self.scheduler is not None:  # stops placing; deep tasks keep running
            await self.scheduler.stop()
        if self.sessions is not None:
            await self.sessions.shutdown(reason)
        if self.sandboxes is not None:
            await self.sandboxes.shutdown(reason)
        if self.server is not None:
            await self.server.stop(SHUTDOWN_GRACE_S)
        if self.audit is not None:
            self.audit.append("daemon.stop", tenant="", peer="daemon",
                              detail={"reason": reason, "cause": cause, "pid": os.getpid()})
            self.audit.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket)
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Sessions end with the documented reason "daemon-shutdown"; the signal that
            # asked for it goes to the log and the daemon.stop record.
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(
                self.stop("daemon-shutdown", cause=f"signal {signal.Signals(s).name}")))
        await self.start()
        await self._stopped.wait()


def _sweep() -> list[str]:
    """sweep(), retried when a sandbox of another live process vanishes while it looks.

    sweep() lists the runtime directory and then stats each entry; a concurrent destroy
    (another daemon, `corral run`) can remove one in between (FileNotFoundError).
    """
    for attempt in range(5):
        try:
            return sweep()
        except FileNotFoundError:
            if attempt == 4:
                raise
            time.sleep(0.05)
    return []


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.monotonic()
    daemon = Daemon(config)
    try:
        asyncio.run(daemon.serve_forever())
    except (RuntimeError, CorralError) as exc:  # e.g. AuditTampered: refuse, say why
        log.error("%s", exc)
        return 1
    log.info("corral daemon stopped after %.1fs", time.monotonic() - started)
    return 0
