"""Daemon configuration: flags and a TOML file that use the same names, with defaults."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field

from corral.sandbox.errors import InvalidSpec
from corral.sandbox.spec import parse_duration, parse_size

from .locations import default_socket, default_state

_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_tenant(name: str, field_name: str = "tenant") -> str:
    if not _TENANT_RE.match(name or ""):
        raise InvalidSpec(field_name, f"{name!r} is not a tenant name (a-z, 0-9, '-', '_')")
    return name


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `corral daemon` can be told; each field is also a flag (--socket ...)."""

    #: Unix socket to listen on (mode 0600).
    socket: str = field(default_factory=default_socket)
    #: Also listen on TCP, e.g. "127.0.0.1:7070" (bearer tokens required; TLS with tls_cert).
    listen: str | None = None
    #: Directory of the daemon's state: audit.db, state.db.
    state: str = field(default_factory=default_state)
    #: Bearer token -> tenant, for TCP clients ([tenants.NAME] token = "..." in TOML).
    tokens: dict[str, str] = field(default_factory=dict)
    #: Tenants allowed to read every tenant's audit records.
    operators: tuple[str, ...] = ("local",)
    #: PEM files for TLS on the TCP listener; client CA turns on mTLS.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    #: Seconds a session with no client attached survives before it is reaped.
    session_idle_ttl_s: float = 300.0
    #: Default lifetime of a sandbox in seconds (a request may ask for less).
    sandbox_ttl_s: float = 3600.0
    #: A paused sandbox's TTL clock stops; this bounds how long it may stay paused (then it
    #: is destroyed, audited with reason "paused-ttl").
    paused_ttl_s: float = 86400.0
    #: Most sandboxes alive at once (sessions included).
    max_sandboxes: int = 512
    #: Replay log of each session/exec stream, in bytes.
    stream_log_bytes: int = 8 << 20
    #: Exec output already sent that each command stream keeps on top, for a client that
    #: drops and resumes with Attach{after_seq}: larger than a client's HTTP/2 receive window.
    exec_replay_bytes: int = 24 << 20
    #: Sessions.OpenMany: least milliseconds between two messages of one stream. News of
    #: its sessions waits at most this long and travels together, which bounds a watching
    #: platform to 1000/N messages per second per stream; 0 sends as soon as the loop is free.
    mux_interval_ms: float = 2.0
    #: Deep tasks one session may have delegated and not yet seen finish (protocol v1.1
    #: DELEGATE); one more is refused with RESOURCE_EXHAUSTED naming this key.
    max_delegations_per_session: int = 16
    #: CPU weight of all deep tasks together: of their cgroup group corral-batch/ (their
    #: sandboxes and the shims that start them) against corral/ (sessions and sandboxes),
    #: the daemon and the host's other processes (cgroup v2 cpu.weight scale, 100 = the
    #: corral group's; v1 cpu.shares in proportion): when CPUs are contended, session
    #: agents go first. 100 gives tasks together the weight of the sessions' group.
    task_cpu_weight: int = 10
    #: Deep-task nodes ([[nodes]] tables: name, labels, resources, devices, executor);
    #: none declared = one local node "local" with this machine's cpu and memory.
    nodes: tuple = ()
    #: Ray cluster address for nodes with executor = "ray" ("auto", "127.0.0.1:6379").
    ray_address: str | None = None
    #: Root-only (0700) directory holding every workspace, each a capped tmpfs
    #: (sandbox/workspace_fs.py); None = /run/corral/workspaces (root).
    workspace_root: str | None = None
    #: Byte cap of one workspace (tmpfs size=; its pages count as the sandbox's memory).
    workspace_bytes: int = 1 << 30
    #: Inode cap of one workspace (tmpfs nr_inodes=).
    workspace_inodes: int = 65536
    #: Bytes preallocated in <state>/.reserve, released when the state filesystem runs
    #: full so the audit log and task store can still write; None = min(64 MiB, 5% of it).
    disk_reserve_bytes: int | None = None
    #: Seconds between two looks at free disk, inodes and descriptors (health, admission).
    resource_check_s: float = 1.0
    #: [policy]: what every non-operator tenant may ask for and hold (runtime/policy.py,
    #: docs/policy.md): profiles, allow_net, max_memory, max_pids, max_cpus, max_tmp,
    #: max_ttl, max_priority, max_sandboxes, max_sessions, max_running_tasks,
    #: max_queued_tasks.
    policy: dict = field(default_factory=dict)
    #: The same keys inside [tenants.NAME], on top of [policy] for that tenant.
    tenant_policies: dict = field(default_factory=dict)
    #: [policy] and [tenants.NAME] policy keys read from this file, or every *.toml of this
    #: directory, instead (runtime/policy_files.py); SIGHUP reloads it. Tokens stay here.
    policy_file: str | None = None
    #: [secrets]: the per-tenant secret store (runtime/secret_store.py): dir, and
    #: [secrets.tenants.NAME] NAME = {file = PATH} or {value = "..."}.
    secrets: dict = field(default_factory=dict)
    #: [pools.NAME]: warm pools (runtime/pools.py): size, backend, image, cpus, memory,
    #: pids, tmp, ttl, profile, tenants, egress ("none", "allow_net" or "secrets": the
    #: requests' egress it serves); a Create of exactly that class takes a ready one.
    pools: dict = field(default_factory=dict)
    #: Bytes of unpacked layers the daemon's image store may hold (runtime/images.py): over
    #: it, after each pull and every 5 minutes, the least recently used images no sandbox
    #: runs on are removed (TOML: image_store_size = "20G"); 0 = no bound (the default).
    image_store_max_bytes: int = 0
    #: Most warm-pool sandboxes started a second, all pools together (fills also wait
    #: while live creates spawn).
    pool_refill_per_s: float = 2.0
    #: The config file these settings came from (inline secret values need it 0600).
    config_path: str | None = None
    #: [audit]: signing (signing_key, signing_command, signing_public_key, signing),
    #: checkpoint_records, checkpoint_interval and [audit.sinks.NAME] (runtime/governance.py).
    audit: dict = field(default_factory=dict)
    #: Audit check at start: "tail" (the head anchor and the records past it) or "full"
    #: (every record of every segment, streamed; refuses to start on a broken chain).
    verify_audit: str = "tail"
    #: Seal the active audit segment into <state>/audit.db.segments/ at this many records
    #: (its audit.seal record included); 0 = no record limit.
    audit_segment_records: int = 100_000
    #: ... or at about this many bytes of record content; 0 = no byte limit.
    audit_segment_bytes: int = 64 << 20
    #: Remove sealed audit segments whose last record is older than this many seconds, behind
    #: an audit.prune record (TOML: audit_retention = "90d"); 0 = keep every segment.
    audit_retention_s: float = 0.0
    #: Remove a finished task (row, RESULT, output files, log, checkpoint) and a lost
    #: attempt's workspace this many seconds after it ended, behind a task.expired /
    #: task.workspace_expired record (TOML: task_retention = "7d"); 0 = keep everything.
    task_retention_s: float = 7 * 86400.0
    #: Serve Prometheus metrics on this HOST:PORT (runtime/metrics.py), e.g.
    #: "127.0.0.1:9464"; port 0 = the kernel picks (daemon.start records metrics_port).
    #: None = off: nothing listens and prometheus_client is not imported.
    metrics: str | None = None
    #: Allow a metrics address that is not loopback (every tenant's activity shows there).
    metrics_public: bool = False
    #: Daemon log lines on stderr: "text", or "json" (one object a line, runtime/logs.py).
    log_format: str = "text"
    #: OpenTelemetry spans (runtime/tracing.py): "otlp" (OTEL_EXPORTER_OTLP_* settings) or
    #: "file:PATH" (one JSON object a span); None = off, nothing imported.
    tracing: str | None = None
    #: Turn on the cgroup2 hierarchy's favordynmods flag at start (root only; it stays on
    #: until reboot on Linux 6.18+): moving a sandbox's process into its cgroup then never
    #: waits for an RCU grace period (sandbox/cgroup_tuning.py). false leaves the host as is.
    cgroup_favordynmods: bool = True
    #: Cgroups kept ready per limits class (sandbox/cgroup_pool.py): a create takes one
    #: instead of making it, a destroy gives it back renewed (v1). 0 = none.
    cgroup_pool_size: int = 4
    #: (user, network) namespace pairs kept ready (sandbox/namespace_pool.py): a sandbox's
    #: PID 1 joins one instead of creating them (root only). 0 = none.
    namespace_pool_size: int = 4
    #: The daemon's event loop (runtime/loop.py): "auto" (uvloop when installed), "asyncio"
    #: or "uvloop".
    event_loop: str = "auto"
    #: The cyclic garbage collector (runtime/loop.py): "latency" (start-up frozen, full
    #: collections on a timer at an on-time tick) or "default" (Python's own).
    gc_policy: str = "latency"
    #: Live restore (runtime/restore.py): sandboxes outlive a daemon restart (SIGKILL,
    #: stop, upgrade), held by a holder process and re-adopted at start. Off by default,
    #: as dockerd's --live-restore: a stopped daemon then leaves processes running that
    #: nothing serves, which an operator must choose knowingly.
    live_restore: bool = False

    def policy_book(self):
        """Every tenant's policy (runtime/policy.py), built from [policy] and [tenants.*].

        Raises:
            InvalidSpec: a bad policy key or value, named as policy.KEY or tenants.NAME.KEY.
        """
        from .policy import PolicyBook

        return PolicyBook.from_config(self.policy, self.tenant_policies, self.sandbox_ttl_s,
                                      self.operators)

    def secret_store(self):
        """The per-tenant secret store of [secrets] (runtime/secret_store.py).

        Raises:
            InvalidSpec: a bad key, naming it (secrets.dir, secrets.tenants.T.NAME).
        """
        from .secret_store import SecretStore

        return SecretStore.from_config(self.secrets, self.config_path)

    def warm_pools(self):
        """The PoolSpecs of [pools.NAME] (runtime/pools.py).

        Raises:
            InvalidSpec: a bad key or value, named pools.NAME.KEY (or pool_refill_per_s).
        """
        from .pools import check_pools

        return check_pools(self.pools, self.sandbox_ttl_s, self.max_sandboxes,
                           self.pool_refill_per_s)

    def validate(self) -> DaemonConfig:
        """Check every setting, naming the first bad one; returns self.

        Raises:
            InvalidSpec: the setting and why, e.g. "listen: '::1' is not HOST:PORT".
        """
        self._check_listeners()
        self._check_limits()
        self._check_audit_and_retention()
        self._check_telemetry()
        from .governance import check_audit_settings

        check_audit_settings(self.audit)
        self.secret_store()  # its keys and inline values checked now, not at first use
        self.warm_pools()
        self.policy_book()  # refuse a bad policy at start, naming its key
        return self

    def _check_listeners(self) -> None:
        """The TCP listener, its tokens and TLS files."""
        if self.listen is not None:
            host, sep, port = self.listen.rpartition(":")
            # Port 0: the kernel picks a free one; the daemon logs it and records it in
            # its daemon.start audit record (tcp_port).
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise InvalidSpec("listen", f"{self.listen!r} is not HOST:PORT")
            if not self.tokens:
                raise InvalidSpec("listen", "a TCP listener needs at least one tenant token")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidSpec("tls_cert", "tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidSpec("tls_client_ca", "mTLS needs tls_cert and tls_key too")
        for path_field in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, path_field)
            if path and not os.path.isfile(path):
                raise InvalidSpec(path_field, f"{path!r} is not a readable file")
        for token, tenant in self.tokens.items():
            check_tenant(tenant)
            if len(token) < 16:
                raise InvalidSpec("tokens", f"the token of tenant {tenant!r} is shorter than 16")

    def _check_limits(self) -> None:
        """Lifetimes, counts, stream buffers, workspace and disk sizes, check intervals."""
        for name in ("session_idle_ttl_s", "sandbox_ttl_s", "paused_ttl_s"):
            if getattr(self, name) <= 0:
                raise InvalidSpec(name, "must be longer than zero")
        if self.max_sandboxes < 1:
            raise InvalidSpec("max_sandboxes", "must be at least 1")
        if isinstance(self.max_delegations_per_session, bool) or not isinstance(
                self.max_delegations_per_session, int) or self.max_delegations_per_session < 0:
            raise InvalidSpec("max_delegations_per_session",
                              f"{self.max_delegations_per_session!r} must be a whole number "
                              ">= 0 (0: sessions may not delegate)")
        w = self.task_cpu_weight
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 10_000:
            raise InvalidSpec("task_cpu_weight", f"{w!r} must be a whole number from 1 to "
                                                 "10000 (100 = the weight of a session's "
                                                 "sandbox)")
        if not isinstance(self.mux_interval_ms, (int, float)) or not (
                0 <= self.mux_interval_ms <= 1000):
            raise InvalidSpec("mux_interval_ms", f"{self.mux_interval_ms!r} must be between 0 "
                                                 "and 1000 ms")
        if not isinstance(self.stream_log_bytes, int) or not (
                64 << 10 <= self.stream_log_bytes <= 1 << 40):
            # exec output's flow control keeps a quarter of it for unread output
            raise InvalidSpec("stream_log_bytes", f"{self.stream_log_bytes!r} must be between "
                                                  "64 KiB and 1 TiB")
        if not isinstance(self.exec_replay_bytes, int) or not (
                1 << 20 <= self.exec_replay_bytes <= 1 << 40):
            raise InvalidSpec("exec_replay_bytes", f"{self.exec_replay_bytes!r} must be "
                                                   "between 1 MiB and 1 TiB")
        if self.workspace_bytes < 1 << 20:
            raise InvalidSpec("workspace_bytes", f"{self.workspace_bytes} is under 1 MiB")
        if self.workspace_inodes < 64:
            raise InvalidSpec("workspace_inodes", f"{self.workspace_inodes} is under 64")
        if self.disk_reserve_bytes is not None and self.disk_reserve_bytes < 0:
            raise InvalidSpec("disk_reserve_bytes", "must not be negative")
        if isinstance(self.image_store_max_bytes, bool) or not isinstance(
                self.image_store_max_bytes, int) or self.image_store_max_bytes < 0:
            raise InvalidSpec("image_store_max_bytes", f"{self.image_store_max_bytes!r} must "
                                                     "be a size in bytes >= 0 (0: no bound)")
        if not 0.05 <= self.resource_check_s <= 60:
            raise InvalidSpec("resource_check_s", "must be between 0.05 and 60 seconds")

    def _check_audit_and_retention(self) -> None:
        """The audit check at start, segment sizes, and how long records and tasks stay."""
        if self.verify_audit not in ("full", "tail"):
            raise InvalidSpec("verify_audit", f"{self.verify_audit!r} is not 'full' or 'tail'")
        for name in ("audit_segment_records", "audit_segment_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidSpec(name, f"{value!r} must be a whole number >= 0 (0: no limit)")
        if self.audit_segment_records == 1:
            raise InvalidSpec("audit_segment_records", "1 leaves no room beside the seal; use "
                                                       "at least 2, or 0 for no limit")
        if self.audit_segment_bytes and self.audit_segment_bytes < 4096:
            raise InvalidSpec("audit_segment_bytes", f"{self.audit_segment_bytes} is under "
                                                     "4096 bytes")
        if self.audit_retention_s < 0:
            raise InvalidSpec("audit_retention", "must not be negative")
        if not isinstance(self.task_retention_s, (int, float)) or self.task_retention_s < 0:
            raise InvalidSpec("task_retention", f"{self.task_retention_s!r} must be a duration "
                                                "(e.g. 7d) or 0 to keep every task")

    def _check_telemetry(self) -> None:
        """Metrics address, tracing target and log format."""
        if self.metrics is not None:
            from .metrics import check_address

            try:
                check_address(self.metrics, bool(self.metrics_public))
            except ValueError as exc:
                raise InvalidSpec("metrics", str(exc)) from None
        if self.tracing is not None:
            from .tracing import check_target

            try:
                check_target(self.tracing)
            except ValueError as exc:
                raise InvalidSpec("tracing", str(exc)) from None
        from .loop import EVENT_LOOPS, GC_POLICIES

        for name, allowed in (("event_loop", EVENT_LOOPS), ("gc_policy", GC_POLICIES)):
            if getattr(self, name) not in allowed:
                raise InvalidSpec(name, f"{getattr(self, name)!r} is not one of "
                                        f"{', '.join(allowed)}")
        if not isinstance(self.cgroup_favordynmods, bool):
            raise InvalidSpec("cgroup_favordynmods", f"{self.cgroup_favordynmods!r} is not "
                                                     "true or false")
        from corral.sandbox import cgroup_pool, namespace_pool

        for name, most in (("cgroup_pool_size", cgroup_pool.MAX_SIZE),
                           ("namespace_pool_size", namespace_pool.MAX_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
                raise InvalidSpec(name, f"{value!r} is not a whole number from 0 to {most}")
        if not isinstance(self.live_restore, bool):
            raise InvalidSpec("live_restore", f"{self.live_restore!r} is not true or false")
        if self.log_format not in ("text", "json"):
            raise InvalidSpec("log_format", f"{self.log_format!r} is not 'text' or 'json'")


_DURATIONS = {"session_idle_ttl": "session_idle_ttl_s", "sandbox_ttl": "sandbox_ttl_s",
              "paused_ttl": "paused_ttl_s"}
_SIZES = {"workspace_size": "workspace_bytes", "disk_reserve": "disk_reserve_bytes",
          "audit_segment_size": "audit_segment_bytes",
          "image_store_size": "image_store_max_bytes"}


def retention_seconds(value, field_name: str = "audit_retention") -> float:
    """A retention age: a duration, or 0 / "forever" to keep everything."""
    if value in (0, "0", "forever"):
        return 0.0
    return parse_duration(value, field_name)


def size_or_zero(value, field_name: str) -> int:
    """parse_size, where 0 (none at all) is allowed too."""
    if value in (0, "0"):
        return 0
    return parse_size(value, field_name)


def load(path: str | None, overrides: dict) -> DaemonConfig:
    """Merge a TOML file (if any) and flag overrides (flags win) into a validated config.

    The file uses the flag names: socket, listen, state, tls_cert, tls_key, tls_client_ca,
    session_idle_ttl ("5m"), sandbox_ttl ("1h"), paused_ttl ("24h"), max_sandboxes,
    stream_log_bytes, exec_replay_bytes, mux_interval_ms, max_delegations_per_session,
    task_cpu_weight, workspace_root, workspace_size ("1G"), workspace_inodes,
    disk_reserve ("64M"), resource_check_s, operators, verify_audit ("full"|"tail"),
    audit_segment_records, audit_segment_size ("64M"), audit_retention ("90d"),
    task_retention ("7d"), metrics ("127.0.0.1:9464"), metrics_public, log_format
    ("text"|"json"), tracing ("otlp"|"file:PATH"), cgroup_favordynmods, cgroup_pool_size,
    namespace_pool_size, event_loop
    ("auto"|"asyncio"|"uvloop"), gc_policy ("latency"|"default"), one table per tenant:
    [tenants.acme] token = "...", the secret store's [secrets], warm pools [pools.NAME]
    and pool_refill_per_s, image_store_size ("20G"; or image_store_max_bytes, in bytes),
    live_restore (true|false).
    """
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise InvalidSpec("config", f"{path!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidSpec("config", f"{path}: {exc}") from None
        values.update(_from_mapping(raw, path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("policy_file"):
        values.update(policy_from_file(values["policy_file"], values))
    known = {f.name for f in dataclasses.fields(DaemonConfig)}
    return DaemonConfig(**{k: v for k, v in values.items() if k in known}).validate()


def policy_from_file(path: str, values: dict) -> dict:
    """policy and tenant_policies from a policy file, refusing policy keys in the daemon
    config too (one place decides)."""
    from .policy_files import load_source

    if values.get("policy") or any(values.get("tenant_policies", {}).values()):
        raise InvalidSpec("policy_file", f"the tenant policy is read from {path}: remove "
                                         "[policy] and the policy keys of [tenants.NAME] "
                                         "from the daemon config (keep the tokens)")
    source = load_source(path)
    return {"policy": source.policy, "tenant_policies": source.tenants}


def _from_mapping(raw: dict, path: str) -> dict:
    out: dict = {}
    for key, value in raw.items():
        if key == "tenants":
            tokens, policies = {}, {}
            for tenant, table in value.items():
                if not isinstance(table, dict):
                    raise InvalidSpec("config", f"{path}: [tenants.{tenant}] must be a table")
                check_tenant(tenant)
                if "token" in table:
                    if not isinstance(table["token"], str):
                        raise InvalidSpec("config", f"{path}: tenants.{tenant}.token must be "
                                                    "a string")
                    tokens[table["token"]] = tenant
                # a table without a token sets the policy of a tenant that reaches the
                # daemon over the unix socket (x-corral-tenant) only
                policies[tenant] = {k: v for k, v in table.items() if k != "token"}
            out["tokens"] = tokens
            out["tenant_policies"] = policies
        elif key in ("audit", "policy", "secrets", "pools"):
            if not isinstance(value, dict):
                raise InvalidSpec("config", f"{path}: [{key}] must be a table")
            out[key] = dict(value)
            if key == "secrets":  # inline values are allowed only in a 0600 file
                out["config_path"] = path
        elif key == "audit_retention":
            out["audit_retention_s"] = retention_seconds(value)
        elif key == "task_retention":
            out["task_retention_s"] = retention_seconds(value, "task_retention")
        elif key in _DURATIONS:
            out[_DURATIONS[key]] = parse_duration(value, key)
        elif key in _SIZES:
            out[_SIZES[key]] = size_or_zero(value, key)
        elif key == "operators":
            out["operators"] = tuple(check_tenant(t, "operators") for t in value)
        elif key == "nodes":
            from .tasks.config import nodes_from_toml

            out["nodes"] = nodes_from_toml(value, path)
        elif key in {f.name for f in dataclasses.fields(DaemonConfig)} and key not in (
                "tokens", "config_path"):
            out[key] = value
        else:
            raise InvalidSpec("config", f"{path}: unknown setting {key!r}")
    return out
