"""The daemon's Prometheus metrics: every definition, the hooks the code calls, /metrics.

Off unless asked (`corral daemon --metrics 127.0.0.1:9464`): then every manager holds
`NO_METRICS`, whose hooks do nothing and which never imports prometheus_client. On, the
daemon makes one `DaemonMetrics` with its own `CollectorRegistry` (never the global one:
two daemons in one process, or a test, never share a series) and hands it to the audit log,
the sandbox, session and task managers, the error mapper and the egress proxy. Each call
site is one line: `self.metrics.sandbox_created(backend, t0)`.

Label values are bounded: backends, states, RPC names, status codes and egress reason
classes come from code; tenants are names the operator configured, plus at most
`MAX_TENANT_LABELS` others (unix-socket callers name their tenant), the rest counted as
"other". No sandbox, session, exec or task id is ever a label value.

Gauges of what the daemon holds (sandboxes, sessions, tasks by state) and the tokens the
sessions took in are read at scrape time from the managers, on the daemon's event loop
(the HTTP server has its own thread; the managers belong to the loop).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections import OrderedDict

log = logging.getLogger("corral.metrics")

#: Tenant label values besides the configured tenants; later ones are "other".
MAX_TENANT_LABELS = 64
#: Timestamps kept for latencies that span two calls (interrupt -> turn end, queued ->
#: placed); past this the oldest is dropped (a latency not measured, never unbounded memory).
MAX_PENDING = 10_000
#: Seconds between two event-loop lag samples.
LOOP_LAG_INTERVAL_S = 0.25
#: Seconds a scrape waits for the event loop to read the managers.
SNAPSHOT_TIMEOUT_S = 5.0

#: Egress decisions -> a bounded reason class (first match of a fragment of the reason the
#: proxy gave, sandbox/proxy.py); anything else is "other".
EGRESS_REASONS = (
    ("address rule", "address_rule"),
    ("name rule", "name_rule"),
    ("protected endpoint", "protected_endpoint"),
    ("no rule allows", "no_rule"),
    ("does not resolve", "unresolved"),
    ("no public address", "unresolved"),
    ("forged name", "forged_name"),
    ("outside the operator's upstream", "upstream_network"),
    ("is an address of this host", "host_address"),
    ("non-public address", "non_public_address"),
    ("connected to", "peer_mismatch"),
    ("closed before a decision", "undecided"),
    ("UDP is dropped", "udp"),
    ("not an HTTP proxy request", "bad_request"),
    ("bad proxy target", "bad_request"),
    ("is not a host name", "bad_request"),
    ("malformed DNS query", "bad_request"),
)

_LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_FAST_BUCKETS = (.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
                 1)


def egress_reason(reason: str) -> str:
    """The bounded class of an egress decision's free-text reason."""
    for fragment, name in EGRESS_REASONS:
        if fragment in reason:
            return name
    return "other"


def check_address(address: str, public: bool) -> tuple[str, int]:
    """HOST:PORT of the metrics listener, split; loopback only unless `public`.

    Raises:
        ValueError: not HOST:PORT, or not loopback without `public` (the message says how).
    """
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    if host == "localhost":
        loopback = True
    else:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (use e.g. 127.0.0.1)") from None
    if not loopback and not public:
        raise ValueError(f"{address} is not a loopback address: metrics show every tenant's "
                         "activity; pass --metrics-public (metrics_public = true) to serve "
                         "them there")
    return host, int(port)


def code_of(exc: BaseException) -> str:
    """The gRPC status name an RPC that raised exc ends with (runtime/api/errors.py)."""
    from corral.sandbox.errors import CorralError, as_exhaustion

    if as_exhaustion(exc) is not None:
        return "RESOURCE_EXHAUSTED"
    if isinstance(exc, CorralError):
        return getattr(exc, "grpc_status", "INTERNAL")
    return "INTERNAL"


def _measure_nothing(*_args, **_kwargs) -> None:
    """A hook with metrics off: nothing is measured, nothing is kept."""


class NoMetrics:
    """Metrics off: every hook does nothing and costs one method call."""

    enabled = False
    port = 0

    def clock(self) -> float:
        """A start time for a later hook (0.0 when off: nothing is measured)."""
        return 0.0

    def timed_spawn(self, fn, backend: str):
        """fn, timed as a spawn of `backend` when metrics are on."""
        return fn

    # The hooks, each the same no-op with metrics off; DaemonMetrics defines each one's
    # arguments and what it measures.
    sandbox_created = exec_started = interrupt_sent = turn_ended = session_removed = \
        entries_sent = watcher_lagged = task_queued = task_unqueued = task_placed = \
        audit_committed = egress_decision = probes_ran = rpc_failed = _measure_nothing


NO_METRICS = NoMetrics()


class DaemonMetrics(NoMetrics):
    """The metrics of one daemon, in their own registry, served on `address` by `start()`.

    Thread-safe where hooks run off the loop (spawner threads, the audit commit thread,
    the egress proxy's thread): prometheus_client's metrics take their own locks.
    """

    enabled = True

    def __init__(self, daemon, address: str, public: bool = False):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.daemon = daemon
        self.host, self._want_port = check_address(address, public)
        self.port = 0
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._lock = threading.Lock()
        self._tenants: set[str] = set()
        self._interrupts: OrderedDict[str, float] = OrderedDict()
        self._queued: OrderedDict[str, float] = OrderedDict()
        self._starting: dict[str, int] = {}  # backend -> spawns under way
        self._tokens_retired = 0  # tokens of sessions no longer held
        self._server = None
        self._thread = None
        self._lag_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

        self.create_seconds = Histogram(
            "corral_sandbox_create_seconds", "Sandboxes.Create from the request to a running "
            "sandbox (quota checks, waiting for a spawner, spawn, audit record)",
            ["backend"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.spawn_seconds = Histogram(
            "corral_sandbox_spawn_seconds", "Starting a sandbox's PID 1 (or container) on a "
            "spawner thread", ["backend"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.exec_seconds = Histogram(
            "corral_exec_start_seconds", "A command's start: request to running process "
            "(exec.start audit record included)", ["backend"], buckets=_LATENCY_BUCKETS,
            registry=reg)
        self.interrupt_seconds = Histogram(
            "corral_session_interrupt_seconds", "A session interrupt to the end of its turn "
            "(the agent's TURN_END, or the forced one after the grace)",
            buckets=_LATENCY_BUCKETS, registry=reg)
        self.token_seconds = Histogram(
            "corral_session_token_latency_seconds", "Sessions.Open: the session stream "
            "having news to the batch holding it handed to gRPC", buckets=_FAST_BUCKETS,
            registry=reg)
        self.placement_seconds = Histogram(
            "corral_task_placement_seconds", "A deep task queued (submitted or retried) to "
            "placed on a node", buckets=_LATENCY_BUCKETS, registry=reg)
        self.audit_seconds = Histogram(
            "corral_audit_commit_seconds", "One audit transaction: insert, commit (fsync), "
            "head anchor", buckets=_FAST_BUCKETS, registry=reg)
        self.loop_lag_seconds = Histogram(
            "corral_event_loop_lag_seconds", f"How late the daemon's event loop ran a timer "
            f"(sampled every {LOOP_LAG_INTERVAL_S}s)", buckets=_FAST_BUCKETS, registry=reg)
        self.entries_out = Counter(
            "corral_session_entries_sent", "Session stream entries (tokens, turn and log "
            "events) sent to clients by Sessions.Open and OpenMany", registry=reg)
        self.lagged = Counter(
            "corral_session_lagged", "Times a session client was told it lagged (the replay "
            "log dropped entries it had not read)", registry=reg)
        self.egress = Counter(
            "corral_egress_decisions", "Egress attempts of sandboxes, as the egress proxy "
            "decided them", ["decision", "kind", "reason"], registry=reg)
        self.probes = Counter(
            "corral_probes", "Conformance probes run (Audit.Report with run_probes), by "
            "verdict", ["verdict"], registry=reg)
        self.errors = Counter(
            "corral_rpc_errors", "RPCs that ended with an error status, by method and code",
            ["method", "code"], registry=reg)
        ProcessCollector(registry=reg)
        reg.register(_HeldCollector(self))

    # -- labels --------------------------------------------------------------------------

    def tenant_label(self, tenant: str) -> str:
        cfg = self.daemon.config
        if tenant in self._tenants or tenant in cfg.operators \
                or tenant in cfg.tenant_policies or tenant in cfg.tokens.values():
            return tenant
        with self._lock:
            if len(self._tenants) < MAX_TENANT_LABELS:
                self._tenants.add(tenant)
                return tenant
        return "other"

    # -- hooks ---------------------------------------------------------------------------

    def clock(self) -> float:
        return time.monotonic()

    def timed_spawn(self, fn, backend: str):
        def spawn(*args):
            with self._lock:
                self._starting[backend] = self._starting.get(backend, 0) + 1
            t0 = time.monotonic()
            try:
                return fn(*args)
            finally:
                self.spawn_seconds.labels(backend).observe(time.monotonic() - t0)
                with self._lock:
                    self._starting[backend] -= 1

        return spawn

    def sandbox_created(self, backend: str, t0: float) -> None:
        self.create_seconds.labels(backend).observe(time.monotonic() - t0)

    def exec_started(self, backend: str, t0: float) -> None:
        self.exec_seconds.labels(backend).observe(time.monotonic() - t0)

    @staticmethod
    def _remember(pending: OrderedDict, key: str) -> None:
        pending[key] = time.monotonic()
        if len(pending) > MAX_PENDING:
            pending.popitem(last=False)

    def interrupt_sent(self, session_id: str) -> None:
        if session_id not in self._interrupts:  # the first interrupt of a turn counts
            self._remember(self._interrupts, session_id)

    def turn_ended(self, session_id: str) -> None:
        t0 = self._interrupts.pop(session_id, None)
        if t0 is not None:
            self.interrupt_seconds.observe(time.monotonic() - t0)

    def session_removed(self, session) -> None:
        self._interrupts.pop(session.id, None)
        self._tokens_retired += session.hub.stream.statistics().tokens

    def entries_sent(self, entries: int, woken_at: float = 0.0) -> None:
        if entries > 0:
            self.entries_out.inc(entries)
        if woken_at:
            self.token_seconds.observe(time.monotonic() - woken_at)

    def watcher_lagged(self) -> None:
        self.lagged.inc()

    def task_queued(self, task_id: str) -> None:
        self._remember(self._queued, task_id)

    def task_unqueued(self, task_id: str) -> None:
        self._queued.pop(task_id, None)

    def task_placed(self, task_id: str) -> None:
        t0 = self._queued.pop(task_id, None)
        if t0 is not None:
            self.placement_seconds.observe(time.monotonic() - t0)

    def audit_committed(self, t0: float) -> None:
        self.audit_seconds.observe(time.monotonic() - t0)

    def egress_decision(self, event: dict) -> None:
        decision = event.get("decision")
        if decision not in ("allow", "deny"):
            return
        kind = str(event.get("kind", "net.connect"))
        if kind not in ("net.connect", "net.dns", "net.udp"):
            kind = "other"
        self.egress.labels(decision, kind, egress_reason(str(event.get("reason", "")))).inc()

    def probes_ran(self, probes: dict) -> None:
        if probes.get("status") != "ran":
            return
        for probe in probes.get("probes", ()):
            self.probes.labels(str(probe.get("verdict", "unknown"))[:32]).inc()

    def rpc_failed(self, method: str, exc: BaseException) -> None:
        self.errors.labels(method, code_of(exc)).inc()

    # -- serving -------------------------------------------------------------------------

    def start(self) -> int:
        """Serve /metrics on a thread; returns the bound port (the kernel's pick for :0).

        Raises:
            RuntimeError: the address cannot be bound (in use, not this host's).
        """
        from prometheus_client import start_http_server

        self._loop = asyncio.get_running_loop()
        try:
            self._server, self._thread = start_http_server(
                self._want_port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"metrics: cannot listen on {self.host}:{self._want_port}: "
                               f"{exc.strerror or exc}") from None
        self.port = self._server.server_port
        self._lag_task = self._loop.create_task(self._sample_loop_lag())
        return self.port

    async def stop(self) -> None:
        """Stop sampling and serving (the HTTP thread is joined off the loop)."""
        if self._lag_task is not None:
            self._lag_task.cancel()
        server, self._server = self._server, None
        if server is not None:
            def close():
                server.shutdown()  # waits for serve_forever's next poll (0.5 s at most)
                server.server_close()
                if self._thread is not None:
                    self._thread.join(5)

            await asyncio.to_thread(close)

    async def _sample_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LOOP_LAG_INTERVAL_S)
            self.loop_lag_seconds.observe(max(0.0, loop.time() - t0 - LOOP_LAG_INTERVAL_S))

    # -- scrape-time readings ------------------------------------------------------------

    def held(self) -> dict:
        """What the daemon holds now, by labels; runs on the event loop."""
        daemon = self.daemon
        sandboxes: dict[tuple, int] = {}
        sessions: dict[tuple, int] = {}
        tasks: dict[tuple, int] = {}
        tokens = self._tokens_retired
        lagged: dict[str, int] = {}
        if daemon.sandboxes is not None:
            for msb in daemon.sandboxes.all():  # the live ones only
                if msb.pool and not msb.tenant:  # a warm pool's, nobody's until acquired
                    key = ("pooled", "", msb.spec.backend)
                else:
                    key = ("running", self.tenant_label(msb.tenant), msb.spec.backend)
                sandboxes[key] = sandboxes.get(key, 0) + 1
        with self._lock:
            for backend, n in self._starting.items():
                if n:
                    key = ("starting", "all", backend)
                    sandboxes[key] = sandboxes.get(key, 0) + n
        if daemon.sessions is not None:
            for session in list(daemon.sessions._sessions.values()):
                if session.exited is not None:
                    state = "exited"
                elif session.closing:
                    state = "closing"
                else:
                    state = "attached" if session.attached else "detached"
                key = (state, self.tenant_label(session.tenant))
                sessions[key] = sessions.get(key, 0) + 1
                stats = session.hub.stream.statistics()
                tokens += stats.tokens
                if stats.lagged_subscribers:
                    tenant = self.tenant_label(session.tenant)
                    lagged[tenant] = lagged.get(tenant, 0) + stats.lagged_subscribers
        if daemon.scheduler is not None:
            for task in list(daemon.scheduler.tasks.values()):
                key = (task.state.name.lower(), self.tenant_label(task.tenant))
                tasks[key] = tasks.get(key, 0) + 1
        pools = daemon.pools.statistics() if getattr(daemon, "pools", None) else {}
        return {"sandboxes": sandboxes, "sessions": sessions, "tasks": tasks,
                "tokens_in": tokens, "pools": pools, "lagged": lagged}

    def held_from_any_thread(self) -> dict | None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return self.held()
        except RuntimeError:
            pass

        async def read():
            return self.held()

        try:
            return asyncio.run_coroutine_threadsafe(read(), loop).result(SNAPSHOT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a stopping loop: the scrape goes without them
            log.warning("metrics: the event loop did not answer; held gauges left out")
            return None


class _HeldCollector:
    """Gauges and counters read from the managers at scrape time."""

    def __init__(self, metrics: DaemonMetrics):
        self.metrics = metrics

    def _families(self, held: dict | None):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sandboxes = GaugeMetricFamily(
            "corral_sandboxes", "Sandboxes held, by state (starting: being spawned; "
            "running; pooled: ready in a warm pool, tenant \"\"), tenant and backend",
            labels=["state", "tenant", "backend"])
        sessions = GaugeMetricFamily(
            "corral_sessions", "Sessions held, by state (attached, detached, closing, "
            "exited) and tenant", labels=["state", "tenant"])
        tasks = GaugeMetricFamily(
            "corral_tasks", "Deep tasks kept, by state and tenant", labels=["state", "tenant"])
        tokens = CounterMetricFamily(
            "corral_session_tokens_in", "TOKEN entries the session agents wrote")
        pools = GaugeMetricFamily(
            "corral_pool_sandboxes", "Warm pools (runtime/pools.py): ready sandboxes, and "
            "the size each keeps", labels=["pool", "state"])
        lagged = GaugeMetricFamily(
            "corral_session_watchers_lagged", "Session watchers behind the replay log now: "
            "their next entry was evicted, so they will be told SessionLagged (the counter "
            "corral_session_lagged counts the tellings)", labels=["tenant"])
        if held is not None:
            for tenant, n in sorted(held["lagged"].items()):
                lagged.add_metric([tenant], n)
            for (state, tenant, backend), n in sorted(held["sandboxes"].items()):
                sandboxes.add_metric([state, tenant, backend], n)
            for (state, tenant), n in sorted(held["sessions"].items()):
                sessions.add_metric([state, tenant], n)
            for (state, tenant), n in sorted(held["tasks"].items()):
                tasks.add_metric([state, tenant], n)
            tokens.add_metric([], held["tokens_in"])
            for name, counts in sorted(held["pools"].items()):
                pools.add_metric([name, "ready"], counts["ready"])
                pools.add_metric([name, "size"], counts["size"])
        return [sandboxes, sessions, tasks, tokens, pools, lagged]

    def describe(self):
        return self._families(None)

    def collect(self):
        return self._families(self.metrics.held_from_any_thread())
