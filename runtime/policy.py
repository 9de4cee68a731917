"""Operator policy per tenant: what a tenant may ask for, and how much of the daemon it may hold.

A request names its own limits (memory, pids, CPUs, /tmp, TTL, profile, egress rules,
priority); the policy decides whether this tenant may ask for them. Quotas bound what one
tenant holds at once (sandboxes, sessions, queued and running tasks), so no tenant fills a
daemon-wide limit alone.

Which policy applies:
* a tenant with its own ``[tenants.NAME]`` table gets ``[policy]`` with that table's keys
  on top;
* any other tenant that is not an operator gets ``[policy]`` (the *tenant default*);
* operators (``operators = [...]``, ``local`` by default) without a table of their own get
  the *operator default*: every built-in profile, any egress rule, and the host's size as
  the only limit.

The tenant default is deliberately narrow: the ``default`` seccomp profile only, egress
rules that name public destinations only (an address rule that touches loopback, private,
link-local, shared or reserved space, ``0.0.0.0/8`` included, is refused unless the
tenant's ``allow_net`` lists it), and limits well under the host's size.

Domain layer: no gRPC types. Refusals are ``PolicyDenied`` (PERMISSION_DENIED: the tenant
asked for something it may never have) or ``QuotaExceeded`` (RESOURCE_EXHAUSTED: it holds
too much right now); both are audited as ``denied`` records by the API layer.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

from corral.sandbox.errors import CorralError, InvalidSpec, PermissionDenied
from corral.sandbox.proxy import NetRule, parse_rule
from corral.sandbox.seccomp import builtin_profile_names
from corral.sandbox.spec import SandboxSpec, parse_duration, parse_size

#: The word in an ``allow_net`` policy list that stands for "any rule that names only
#: public destinations" (the tenant default).
PUBLIC = "public"

#: Address space no tenant reaches without the operator listing it: everything the
#: kernel treats as this host, and everything that is not the public internet.
_NON_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",        # "this network": Linux connects 0.0.0.0 to the local host
    "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
))


class PolicyDenied(PermissionDenied):
    """The tenant's policy never allows what the request asks for."""


class QuotaExceeded(CorralError):
    """The tenant already holds as much of something as its policy allows.

    RESOURCE_EXHAUSTED like the daemon's own exhaustion, but a denial of this tenant (it
    is audited as one), not a sign that the daemon is short of anything.
    """

    grpc_status = "RESOURCE_EXHAUSTED"
    denial = True


class RateLimited(QuotaExceeded):
    """The tenant sent requests faster than its max_request_rate."""


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def host_pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except OSError:
        return 1 << 22


@dataclass(frozen=True)
class TenantPolicy:
    """What one tenant may ask for and hold. None = no limit of this policy's own."""

    #: Seccomp profiles the tenant may name (built-in names, or absolute paths of
    #: operator-provided profile files).
    profiles: tuple[str, ...] = ("default",)
    #: Egress rules the tenant may ask for: each requested rule must be covered by one of
    #: these (same name; a *.wildcard covering it; a network containing it; port equal or
    #: unset here). "public" covers any rule naming public destinations only.
    #: None = any rule at all (operators).
    allow_net: tuple[str, ...] | None = (PUBLIC,)
    #: Largest memory limit of one sandbox, in bytes.
    max_memory_bytes: int | None = 4 << 30
    #: Largest pids limit of one sandbox.
    max_pids: int | None = 1024
    #: Largest CPU quota of one sandbox, in cores (None as a request = no quota, refused
    #: when this is set).
    max_cpus: float | None = None
    #: Largest /tmp (tmpfs) of one sandbox, in bytes.
    max_tmp_bytes: int | None = 1 << 30
    #: Longest lifetime of one sandbox, in seconds (requests for more get this).
    max_ttl_s: float | None = None
    #: Highest priority of a deep task.
    max_priority: int | None = 10
    #: Sandboxes alive at once (session sandboxes included).
    max_sandboxes: int | None = 32
    #: Interactive sessions alive at once.
    max_sessions: int | None = 32
    #: Sandbox ports exposed on the host at once (runtime/ports.py).
    max_exposed_ports: int | None = 16
    #: Deep tasks placed or running at once (more wait in the queue).
    max_running_tasks: int | None = 4
    #: Deep tasks waiting or running (not yet finished) at once; more are refused.
    max_queued_tasks: int | None = 1000
    #: API requests per second, averaged over a 2-second burst (every RPC, and every
    #: start or resume on a session stream).
    max_request_rate: float | None = 200.0
    #: Host directories (absolute; each with everything below it) the tenant may show at
    #: /workspace (SandboxSpec.workspace_dir). None = any directory (operators).
    host_dirs: tuple[str, ...] | None = ()
    #: Snapshots kept at once, and the bytes their own layers hold (Snapshots.Create).
    max_snapshots: int | None = 32
    max_snapshot_bytes: int | None = 8 << 30

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def operator_default(cls) -> TenantPolicy:
        """Every built-in profile, any egress rule, limits at the host's size."""
        return cls(profiles=builtin_profile_names(), allow_net=None,
                   max_memory_bytes=host_memory_bytes(), max_pids=host_pid_max(),
                   max_cpus=float(host_cpus()), max_tmp_bytes=host_memory_bytes(),
                   max_ttl_s=None, max_priority=None, max_sandboxes=None, max_sessions=None,
                   max_exposed_ports=None, max_running_tasks=None, max_queued_tasks=None,
                   max_request_rate=None, host_dirs=None, max_snapshots=None,
                   max_snapshot_bytes=None)

    @classmethod
    def tenant_default(cls) -> TenantPolicy:
        return cls(max_cpus=float(host_cpus()))

    def with_settings(self, table: Mapping, where: str) -> TenantPolicy:
        """This policy with the keys of a TOML table on top (sizes and durations as text).

        Raises:
            InvalidSpec: an unknown key or a value of the wrong kind, naming `where.key`.
        """
        changes: dict = {}
        for key, value in table.items():
            name = _KEY_FIELDS.get(key)
            if name is None:
                known = ", ".join(sorted(_KEY_FIELDS))
                raise InvalidSpec(f"{where}.{key}", f"unknown policy setting (known: {known})")
            changes[name] = _convert(name, value, f"{where}.{key}")
        return replace(self, **changes)

    # -- checks -----------------------------------------------------------------------------

    def check_sandbox(self, spec: SandboxSpec, field_prefix: str = "spec") -> None:
        """Refuse a spec this policy never allows.

        Raises:
            PolicyDenied: naming the field, what was asked and what the policy allows.
        """
        p = field_prefix
        if spec.profile not in self.profiles:
            allowed = ", ".join(self.profiles) or "none"
            if spec.profile not in builtin_profile_names() and not os.path.isabs(spec.profile):
                # not a profile at all: a caller mistake, never a lookup on disk
                raise InvalidSpec("profile", f"no profile named {_quote(spec.profile)}; "
                                             f"this tenant may use: {allowed}")
            raise PolicyDenied(f"{p}.profile: {_quote(spec.profile)} is not allowed for this "
                               f"tenant (allowed: {allowed})")
        _at_most(f"{p}.memory_bytes", spec.memory_bytes, self.max_memory_bytes)
        _at_most(f"{p}.pids_max", spec.pids_max, self.max_pids)
        _at_most(f"{p}.tmp_bytes", spec.tmp_bytes, self.max_tmp_bytes)
        if self.max_cpus is not None:
            if spec.cpus is None:
                raise PolicyDenied(f"{p}.cpus: no CPU quota is not allowed for this tenant "
                                   f"(at most {self.max_cpus:g} cores)")
            _at_most(f"{p}.cpus", float(spec.cpus), self.max_cpus)
        self.check_net(spec.allow_net, f"{p}.allow_net")
        if spec.workspace is not None:
            self.check_host_dir(spec.workspace, f"{p}.workspace_dir")

    def check_host_dir(self, path: str, field_name: str) -> None:
        """Refuse a host directory outside the tenant's host_dirs (path already resolved:
        no link or '..' can lead out of a granted one)."""
        if self.host_dirs is None:
            return
        if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in self.host_dirs):
            allowed = ", ".join(self.host_dirs) or "none"
            raise PolicyDenied(f"{field_name}: {_quote(path)} is not under a host directory "
                               f"this tenant may use (host_dirs: {allowed})")

    def check_net(self, rules: Iterable[str], field_name: str = "spec.allow_net") -> None:
        if self.allow_net is None:
            return
        granted = [g for g in self.allow_net if g != PUBLIC]
        granted_rules = [parse_rule(g) for g in granted]
        public_ok = PUBLIC in self.allow_net
        for text in rules:
            rule = parse_rule(text)
            if any(covers(g, rule) for g in granted_rules):
                continue
            if public_ok and is_public_rule(rule):
                continue
            why = ("it reaches non-public addresses (loopback, private, link-local or "
                   "reserved space)" if not is_public_rule(rule) else "no rule of the "
                   "tenant's policy covers it")
            raise PolicyDenied(f"{field_name}: {_quote(text)} is not allowed for this tenant: "
                               f"{why}")

    def ttl(self, requested_s: float | None, default_s: float,
            field_name: str = "spec.ttl_s") -> float:
        """The lifetime a sandbox gets: what was asked, never silently shortened; when
        nothing was asked, default_s within the policy's maximum.

        Raises:
            PolicyDenied: what was asked is over the policy's max_ttl.
        """
        limit = self.max_ttl_s
        if not requested_s:
            return default_s if limit is None else min(default_s, limit)
        if limit is not None and requested_s > limit:
            raise PolicyDenied(f"{field_name}: {requested_s:g} is over this tenant's limit of "
                               f"{limit:g} seconds (max_ttl)")
        return requested_s

    def check_priority(self, priority: int) -> None:
        _at_most("spec.priority", priority, self.max_priority)

    def check_count(self, what: str, held: int, limit_name: str) -> None:
        """Refuse one more of `what` when the tenant already holds its quota.

        Raises:
            QuotaExceeded: naming the quota and how many are held.
        """
        limit = getattr(self, limit_name)
        if limit is not None and held >= limit:
            raise QuotaExceeded(f"this tenant already has {held} {what}, the most its policy "
                                f"allows ({limit_name.removeprefix('max_')} = {limit})")

    def describe(self) -> dict:
        """The policy as plain data (for the audit trail and `corral policy`-style views)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def covers(granted: NetRule, asked: NetRule) -> bool:
    """Whether every connection `asked` allows is also allowed by `granted`."""
    if granted.port is not None and granted.port != asked.port:
        return False
    if granted.kind == "address":
        return (asked.kind == "address" and asked.network.version == granted.network.version
                and asked.network.subnet_of(granted.network))
    if asked.kind == "address":
        return False
    if granted.kind == "name":
        return asked.kind == "name" and asked.name == granted.name
    # a wildcard covers names below it, and narrower-or-equal wildcards
    return asked.name.endswith("." + granted.name) or (
        asked.kind == "wildcard" and asked.name == granted.name)


def is_public_rule(rule: NetRule) -> bool:
    """A name rule is public (the proxy refuses names that resolve to non-public space);
    an address rule only when no address of it is non-public."""
    if rule.kind != "address":
        return True
    return not any(rule.network.version == n.version and rule.network.overlaps(n)
                   for n in _NON_PUBLIC)


class PolicyBook:
    """Every tenant's policy, from the daemon config."""

    def __init__(self, default: TenantPolicy, per_tenant: Mapping[str, TenantPolicy],
                 operators: Iterable[str] = ("local",),
                 operator_default: TenantPolicy | None = None):
        self.default = default
        self.per_tenant = dict(per_tenant)
        self.operators = frozenset(operators)
        self.operator_default = operator_default or TenantPolicy.operator_default()
        self._buckets: dict[str, list[float]] = {}  # tenant -> [tokens, last refill]

    def of(self, caller) -> TenantPolicy:
        """The policy of a Caller (anything with .tenant and .operator)."""
        own = self.per_tenant.get(caller.tenant)
        if own is not None:
            return own
        return self.operator_default if caller.operator else self.default

    def charge(self, caller, weight: float = 1.0) -> None:
        """Count a request of the caller against its tenant's max_request_rate.

        A token bucket per tenant: max_request_rate tokens a second, up to two seconds'
        worth saved up, so a burst passes and a flood is cut to the rate. A big request
        weighs more (`request_weight`): a flood of megabyte requests costs the daemon its
        bytes, not just its count.

        Raises:
            RateLimited: the tenant is over its rate (nothing was done).
        """
        rate = self.of(caller).max_request_rate
        if rate is None:
            return
        now = time.monotonic()
        bucket = self._buckets.get(caller.tenant)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:  # tenants are configured, but be safe
                self._buckets.clear()
            bucket = self._buckets[caller.tenant] = [2 * rate, now]
        tokens = min(2 * rate, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < weight:
            bucket[0] = tokens
            raise RateLimited(f"this tenant is over its request rate ({rate:g} a second); "
                              "retry later")
        bucket[0] = tokens - weight

    @staticmethod
    def request_weight(nbytes: int) -> float:
        """What a request of nbytes counts against the rate: 1, plus 1 per 64 KiB."""
        return 1.0 + nbytes / REQUEST_WEIGHT_BYTES

    def of_tenant(self, tenant: str) -> TenantPolicy:
        """The policy of a tenant by name (for work whose caller is gone, e.g. queued
        tasks after a restart); operators as the config lists them."""
        own = self.per_tenant.get(tenant)
        if own is not None:
            return own
        return self.operator_default if tenant in self.operators else self.default

    @classmethod
    def from_config(cls, default_table: Mapping, tenant_tables: Mapping[str, Mapping],
                    default_ttl_s: float, operators: Iterable[str] = ("local",)) -> PolicyBook:
        """Build from `[policy]` and the policy keys of each `[tenants.NAME]` table.

        Raises:
            InvalidSpec: a bad key or value, named as `policy.KEY` or `tenants.NAME.KEY`.
        """
        base = replace(TenantPolicy.tenant_default(), max_ttl_s=default_ttl_s)
        default = base.with_settings(default_table, "policy")
        per = {name: default.with_settings(table, f"tenants.{name}")
               for name, table in tenant_tables.items() if table}
        return cls(default, per, operators)


# -- settings ---------------------------------------------------------------------------------

#: TOML key -> field. Sizes take "4G", durations "2h", like the rest of the config.
_KEY_FIELDS = {
    "profiles": "profiles", "allow_net": "allow_net", "max_memory": "max_memory_bytes",
    "max_pids": "max_pids", "max_cpus": "max_cpus", "max_tmp": "max_tmp_bytes",
    "max_ttl": "max_ttl_s", "max_priority": "max_priority", "max_sandboxes": "max_sandboxes",
    "max_sessions": "max_sessions", "max_exposed_ports": "max_exposed_ports",
    "max_running_tasks": "max_running_tasks",
    "max_queued_tasks": "max_queued_tasks", "max_request_rate": "max_request_rate",
    "host_dirs": "host_dirs", "max_snapshots": "max_snapshots",
    "max_snapshot_size": "max_snapshot_bytes",
}
#: A request counts once more against the rate for every this many bytes it carries.
REQUEST_WEIGHT_BYTES = 64 << 10
#: Tenants with a rate bucket at most (a bound on the map, whatever names callers use).
_MAX_BUCKETS = 4096


def _convert(name: str, value, where: str):
    if name == "host_dirs":
        if not isinstance(value, list) or not all(
                isinstance(v, str) and os.path.isabs(v) and "\0" not in v for v in value):
            raise InvalidSpec(where, "must be a list of absolute paths")
        return tuple(os.path.realpath(v) for v in value)
    if name in ("profiles", "allow_net"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise InvalidSpec(where, "must be a list of strings")
        if name == "allow_net":
            for v in value:
                if v != PUBLIC:
                    try:
                        parse_rule(v)
                    except InvalidSpec as exc:
                        raise InvalidSpec(where, str(exc).removeprefix(f"{exc.field}: ")) \
                            from None
        else:
            builtin = builtin_profile_names()
            for v in value:
                if v not in builtin and not os.path.isabs(v):
                    raise InvalidSpec(where, f"{v!r} is not a built-in profile "
                                             f"({', '.join(builtin)}) or an absolute path")
        return tuple(value)
    if name.endswith("_bytes"):
        return parse_size(value, where)
    if name == "max_ttl_s":
        return parse_duration(value, where)
    if name in ("max_cpus", "max_request_rate"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidSpec(where, f"{value!r} must be a positive number")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSpec(where, f"{value!r} must be a whole number, 0 or more")
    return value


def _at_most(field_name: str, asked, limit) -> None:
    if limit is not None and asked > limit:
        show = (_size if field_name.endswith("_bytes") else
                (lambda v: f"{v:g}") if isinstance(limit, float) else str)
        raise PolicyDenied(f"{field_name}: {show(asked)} is over this tenant's limit of "
                           f"{show(limit)}")


def _size(n: int) -> str:
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.4g}{unit}"
    return f"{n} bytes"


def _quote(text: str, limit: int = 120) -> str:
    """repr() of tenant text, cut so an error never echoes a huge field."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
