"""Warm pools: sandboxes started before anyone asks, handed whole to a matching Create.

A pool (`[pools.NAME]` in the daemon config) keeps `size` ready sandboxes of one spec
class. Each is spawned by `SandboxManager.launch`, the path of every cold Create, so its
isolation is a cold sandbox's; until acquired it belongs to no tenant (tenant "", which no
caller can name) and is invisible to every List and Get.

The match (`PoolSpec.serves`) is exact. A request is served by a pool when
- its tenant is one of the pool's `tenants` (empty: every tenant);
- its SandboxSpec equals the pool's class in every field but these: `env`, applied to
  each command at acquire time (the sandbox's spec takes the request's env, and its policy
  digest is computed again); `workspace`, a host directory mounted at acquire over the
  sandbox's /workspace, idmapped to its root as a cold create does
  (sandbox/live_mounts.py); `labels`; and, on a pool with `egress`, `allow_net` and
  `secrets` (below). So profile, limits (memory, pids, cpus, tmp, nofile, fsize, command
  timeout), backend, image, hostname, uid range and every other source of state must be
  the class's, and a request with workspace_cow, a snapshot, binds or devices is never a
  match and is created cold: overlays and binds are built before the mount namespace is
  sealed. A host workspace on a pool whose profile is "unconfined" goes cold too (and is
  refused there, with why);
- its egress is the pool's `egress` class: "none" (the default) serves requests without
  allow_net and secrets, "allow_net" those with allow_net and no secrets, "secrets" those
  with secrets (and any allow_net). What of egress is fixed before PID 1 runs is the
  class's, so it is made at the fill as a cold create of the class makes it: the
  generated /etc/resolv.conf names the egress resolver, the egress link (veth and
  steering, sandbox/net.py) is made and registered with the proxy, and for "secrets" a
  trust directory is bound read-only over /etc/ssl/certs. Until acquire the link's only
  rule is BIRTH_RULE, a name that never resolves, and a "secrets" sandbox's trust holds a
  CA of its own for no real host (BIRTH_SECRET). At acquire the request's secrets are
  read from the store for its tenant (a SecretSet: placeholders and a CA made now), the
  CA replaces the birth CA in the trust directory, and the proxy serves the link under
  the request's rules, secrets and tenant (EgressProxy.rebind); commands then get the
  placeholders and the proxy variables from the sandbox's spec, as a cold one's do. A
  request whose secrets cannot be read goes cold (which reports why);
- its TTL is no longer than the pool's `ttl`: the sandbox's clock starts at acquire.
The tenant, labels, TTL, owning session and (through create_once) request_id are set at
acquire; the Create is audited as `sandbox.create` with `pool=NAME` in its detail. The
pool's own spawns are system records, `sandbox.pool.fill` (tenant "", detail pool).

A pooled sandbox is never given back: once acquired it is an ordinary sandbox of its
tenant, destroyed by Destroy or its TTL, and the pool spawns a new one. Fills are
serial, at most `pool_refill_per_s` starts a second for the whole daemon, and wait while
any live Create is spawning (fills never take a spawner from live traffic). Ready
sandboxes count against max_sandboxes like any live one (a cold Create is refused when
ready + live + spawning reach it) but against no tenant's quota until acquired. On daemon
stop the fills stop and every ready sandbox is destroyed (`sandbox.destroy`, reason
"pool-drain"); after a crash they die with the daemon (PR_SET_PDEATHSIG) and the
restart's sweep removes what they left, as for any sandbox.

With live restore on (runtime/restore.py), a pool whose class can be kept spawns its
sandboxes to outlive the daemon (die_with_parent off) and hands each to the holder as a
transient group: the holder SIGKILLs a ready sandbox's PID 1 as soon as the daemon's
connection ends (SIGKILL, crash, stop), so ready sandboxes still die with their daemon. At
acquire, once the sandbox is the tenant's (workspace attached, egress rebound), it is kept
as a cold create's is (SandboxManager.keep: its descriptors held for good, its row in
restore.db) and survives a restart; `sandbox.create` says `live_restore: kept`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from corral.sandbox import SandboxSpec
from corral.sandbox.errors import CorralError, InvalidSpec
from corral.sandbox.spec import SecretBinding, parse_duration, parse_size
from corral.sandbox.workspace import Workspace

from .auth import Caller

log = logging.getLogger("corral.pools")

#: The owner of a ready sandbox: a name check_tenant refuses, so no caller can be it.
POOL_TENANT = ""
#: Who destroys ready sandboxes when the pools drain.
POOL_CALLER = Caller(POOL_TENANT, "pool")
#: Seconds a fill waits before looking again while live creates spawn or the daemon is full.
BACKOFF_S = 0.05
#: Longest wait after fills that failed in a row (the wait doubles from one second).
MAX_FAILURE_WAIT_S = 60.0
#: Keys of a [pools.NAME] table.
POOL_KEYS = ("size", "backend", "image", "cpus", "memory", "pids", "tmp", "ttl", "profile",
             "tenants", "egress")
#: A pool's egress classes: the requests it serves have no egress, allow_net only, or
#: secrets (module docstring).
POOL_EGRESS = ("none", "allow_net", "secrets")
#: The rule a ready sandbox of an egress pool is born linked under: a name in .invalid,
#: which never resolves (RFC 6761), so the link reaches nothing until acquire.
BIRTH_HOST = "pool.invalid"
BIRTH_RULE = f"{BIRTH_HOST}:1"
#: The secret a ready sandbox of a "secrets" pool is born with, bound to BIRTH_HOST with a
#: random value: it gives the sandbox its trust directory (with a CA for BIRTH_HOST only);
#: acquire replaces it, its CA and its placeholder with the request's.
BIRTH_SECRET = "CORRAL_POOL_BIRTH"
#: Backends a pool may hold (a docker container's env is fixed when it is created).
POOL_BACKENDS = ("native",)


@dataclass(frozen=True)
class PoolSpec:
    """One [pools.NAME] table: the spec class its sandboxes have, and how many wait."""

    name: str
    #: Ready sandboxes the pool keeps.
    size: int
    #: What every sandbox of the pool is (fields a Create must equal, but env and labels).
    template: SandboxSpec
    #: Longest TTL (seconds) a request it serves may ask for.
    ttl_s: float
    #: Tenants it serves; empty = every tenant.
    tenants: tuple[str, ...] = ()
    #: One of POOL_EGRESS: which requests' egress it serves.
    egress: str = "none"

    def serves(self, tenant: str, spec: SandboxSpec, ttl_s: float) -> bool:
        """Whether a Create of tenant for spec with this TTL takes one of ours (the
        module docstring has the rule)."""
        if self.tenants and tenant not in self.tenants:
            return False
        if ttl_s > self.ttl_s:
            return False
        if spec.workspace_cow:  # an overlay set up before PID 1 starts
            return False
        if spec.workspace is not None and self.template.profile == "unconfined":
            return False  # refused cold, with the reason (no filter keeps setuid files out)
        if egress_class(spec) != self.egress:
            return False
        return dataclasses.replace(spec, env=(), labels=(), workspace=None, allow_net=(),
                                   secrets=()) == self.template

    def birth(self) -> tuple[SandboxSpec, dict[str, str] | None]:
        """The spec a ready sandbox is spawned with, and its secrets' values: the class,
        with the birth rule or secret of an egress pool (module docstring)."""
        if self.egress == "secrets":
            return (dataclasses.replace(self.template, secrets=(
                        SecretBinding(BIRTH_SECRET, (BIRTH_HOST,)),)),
                    {BIRTH_SECRET: os.urandom(16).hex()})
        if self.egress == "allow_net":
            return dataclasses.replace(self.template, allow_net=(BIRTH_RULE,)), None
        return self.template, None


def egress_class(spec: SandboxSpec) -> str:
    """The POOL_EGRESS class a request's spec needs."""
    return "secrets" if spec.secrets else "allow_net" if spec.allow_net else "none"


def pools_from_config(tables: dict, default_ttl_s: float) -> tuple[PoolSpec, ...]:
    """The PoolSpecs of the daemon config's [pools.NAME] tables.

    Raises:
        InvalidSpec: a bad table or value, named pools.NAME.KEY.
    """
    from .config import check_tenant

    if not isinstance(tables, dict):
        raise InvalidSpec("pools", "must be a table of [pools.NAME] tables")
    return tuple(_pool_from_table(name, table, default_ttl_s, check_tenant)
                 for name, table in sorted(tables.items()))


def _pool_from_table(name: str, table, default_ttl_s: float, check_tenant) -> PoolSpec:
    """One [pools.NAME] table, checked key by key."""
    where = f"pools.{name}"
    check_tenant(name, where)  # the same alphabet: a metric label and an audit value
    if not isinstance(table, dict):
        raise InvalidSpec(where, "must be a table")
    for key in table:
        if key not in POOL_KEYS:
            raise InvalidSpec(f"{where}.{key}", f"unknown setting; use {', '.join(POOL_KEYS)}")
    size = table.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1024:
        raise InvalidSpec(f"{where}.size", f"{size!r} must be a whole number from 1 to 1024")
    backend = table.get("backend", "native")
    if backend not in POOL_BACKENDS:
        raise InvalidSpec(f"{where}.backend", f"{backend!r}: pools hold "
                                              f"{' or '.join(POOL_BACKENDS)} sandboxes only")
    kw: dict = {"backend": backend}
    for key, field_name in (("image", "image"), ("profile", "profile")):
        if key in table:
            if not isinstance(table[key], str):
                raise InvalidSpec(f"{where}.{key}", f"{table[key]!r} is not a string")
            kw[field_name] = table[key]
    for key, field_name in (("memory", "memory_bytes"), ("tmp", "tmp_bytes")):
        if key in table:
            kw[field_name] = parse_size(table[key], f"{where}.{key}")
    if "pids" in table:
        pids = table["pids"]
        if isinstance(pids, bool) or not isinstance(pids, int) or pids < 1:
            raise InvalidSpec(f"{where}.pids", f"{pids!r} must be a whole number >= 1")
        kw["pids_max"] = pids
    if "cpus" in table:
        cpus = table["cpus"]
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0:
            raise InvalidSpec(f"{where}.cpus", f"{cpus!r} must be a number of cores > 0")
        kw["cpus"] = float(cpus)
    ttl_s = parse_duration(table["ttl"], f"{where}.ttl") if "ttl" in table else default_ttl_s
    if ttl_s > default_ttl_s:
        raise InvalidSpec(f"{where}.ttl", f"{ttl_s:g} is over the daemon's sandbox_ttl "
                                          f"({default_ttl_s:g})")
    tenants = table.get("tenants", [])
    if not isinstance(tenants, list):
        raise InvalidSpec(f"{where}.tenants", "must be a list of tenant names")
    tenants = tuple(check_tenant(t, f"{where}.tenants") for t in tenants)
    egress = table.get("egress", "none")
    if egress not in POOL_EGRESS:
        raise InvalidSpec(f"{where}.egress", f"{egress!r}: use one of "
                                             f"{', '.join(map(repr, POOL_EGRESS))}")
    try:
        template = SandboxSpec(**kw)
    except InvalidSpec as exc:  # named as the pool's key, not the spec's field
        raise InvalidSpec(f"{where}.{exc.field}",
                          str(exc).removeprefix(f"{exc.field}: ")) from None
    return PoolSpec(name=name, size=size, template=template, ttl_s=ttl_s, tenants=tenants,
                    egress=egress)


def check_pools(tables: dict, default_ttl_s: float, max_sandboxes: int,
                refill_per_s) -> tuple[PoolSpec, ...]:
    """pools_from_config, plus the daemon-wide bounds: the pools leave room for cold
    creates under max_sandboxes, and the refill rate is a positive number.

    Raises:
        InvalidSpec: naming pools.NAME.KEY, pools or pool_refill_per_s.
    """
    if isinstance(refill_per_s, bool) or not isinstance(refill_per_s, (int, float)) or not (
            0 < refill_per_s <= 1000):
        raise InvalidSpec("pool_refill_per_s", f"{refill_per_s!r} must be a number of "
                                               f"sandboxes a second, above 0 and up to 1000")
    pools = pools_from_config(tables, default_ttl_s)
    total = sum(p.size for p in pools)
    if pools and total >= max_sandboxes:
        raise InvalidSpec("pools", f"the pools hold {total} sandboxes, which leaves no room "
                                   f"under max_sandboxes ({max_sandboxes}) for cold creates")
    return pools


class WarmPools:
    """The daemon's pools: ready sandboxes by pool, handed out by acquire(), refilled by
    one background task at a bounded rate."""

    def __init__(self, manager, pools: tuple[PoolSpec, ...], refill_per_s: float, audit):
        self.manager = manager
        self.audit = audit
        self.pools = {p.name: p for p in pools}
        self.ready: dict[str, deque] = {p.name: deque() for p in pools}
        self._interval_s = 1.0 / refill_per_s
        self._filling = 0
        self._wake = asyncio.Event()
        self._stopping = False
        #: Destroys of sandboxes found dead at acquire (held so the loop keeps them).
        self._dead: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Begin filling (on the daemon's loop)."""
        self._task = asyncio.get_running_loop().create_task(self._refill())

    def statistics(self) -> dict[str, dict[str, int]]:
        """Each pool's ready sandboxes and size (the pool gauges of runtime/metrics.py)."""
        return {name: {"ready": len(self.ready[name]), "size": pool.size}
                for name, pool in self.pools.items()}

    async def acquire(self, caller: Caller, spec: SandboxSpec, ttl_s: float,
                      owner_session: str | None, labels: dict[str, str] | None):
        """A ready sandbox of the first pool that serves this request, now the caller's
        (its host workspace attached, its egress under the request's rules and secrets,
        TTL from now, labels, owning session, the request's env), or None: go cold. The
        secrets are read before a sandbox is taken; the sandbox is taken with no await
        between the check and the take, so no other request can take the same one."""
        serving = [p for p in self.pools.values() if p.serves(caller.tenant, spec, ttl_s)]
        if not any(self.ready[p.name] for p in serving):
            return None
        secrets = await self._secret_set(caller, spec) if spec.secrets else None
        if spec.secrets and secrets is None:
            return None
        msb = self._take(serving)
        if msb is None:
            return None
        if spec.workspace is not None and not await self._attach(caller, msb, spec.workspace):
            return None
        egress = self.pools[msb.pool].egress != "none"
        if spec.env or spec.workspace or egress:  # every exec reads env from the spec
            msb.spec = msb.sandbox.spec = dataclasses.replace(
                msb.spec, env=spec.env, workspace=spec.workspace, allow_net=spec.allow_net,
                secrets=spec.secrets)
            msb.policy_digest = msb.sandbox.policy_digest()
        if egress and not await self._link(caller, msb, secrets):
            return None
        now = time.time()
        msb.tenant = caller.tenant
        msb.labels = dict(labels or {})
        msb.owner_session = owner_session
        msb.created_at, msb.expires_at = now, now + ttl_s
        self.manager.renumber(msb)
        if not msb.spec.die_with_parent and not self.manager.not_kept_because(
                msb.spec, owner_session):
            if spec.workspace is not None:  # state.json names the attached one (adopt)
                await self.manager.run_blocking(msb.sandbox._write_state, tenant=caller.tenant)
            self.manager.keep(msb)
        return msb

    async def _secret_set(self, caller: Caller, spec: SandboxSpec):
        """The request's SecretSet (values from the store for the caller's tenant, new
        placeholders, its CA made), or None when it cannot be had: the cold create that
        follows reports why."""
        from corral.sandbox.secrets import SecretSet

        def made():
            values = self.manager.secrets.values_for(caller.tenant, spec.secrets)
            secrets = SecretSet(spec.secrets, values)
            del values
            secrets.ca  # noqa: B018 - key and certificate made here, off the loop
            return secrets

        try:
            return await self.manager.run_blocking(made, tenant=caller.tenant)
        except CorralError:
            return None

    async def _link(self, caller: Caller, msb, secrets) -> bool:
        """Put msb's egress under its (new) spec's rules, the request's secrets and the
        caller's tenant: the CA of the secrets into its trust directory, then the proxy
        rebound. On failure the sandbox is destroyed and False says go cold."""
        from corral.sandbox.secrets import replace_trust_ca

        sandbox = msb.sandbox
        policy = {"digest": msb.policy_digest}  # stamped on its egress records
        listener = self.manager.net_listener(caller.tenant, policy)

        def link() -> None:
            if secrets is not None:
                replace_trust_ca(os.path.join(sandbox.runtime_dir, "trust"),
                                 secrets.ca.cert_pem)
            sandbox.egress.rebind(msb.spec.allow_net, listener, secrets=secrets)
            sandbox.secrets, sandbox.on_net_event = secrets, listener

        try:
            await self.manager.run_blocking(link, tenant=caller.tenant)
        except (CorralError, OSError) as exc:
            log.warning("pool %s: linking %s's egress failed (%s); creating cold", msb.pool,
                        msb.id, exc)
            await self.manager.destroy(POOL_CALLER, msb.id, reason="pool-acquire-failed")
            return False
        return True

    def _take(self, serving: list[PoolSpec]):
        """A ready sandbox of the first of these pools (those that serve the request)
        that has one, or None. One whose PID 1 has ended while it waited (killed from
        outside) is never handed out: it is destroyed in the background and the next one
        is taken."""
        for pool in serving:
            ready = self.ready[pool.name]
            while ready:
                msb = ready.popleft()
                self._wake.set()  # room to refill
                if not msb.sandbox.init_exited():  # pools hold native sandboxes
                    return msb
                log.warning("pool %s: sandbox %s died while it waited; destroying it",
                            pool.name, msb.id)
                self._dead.add(asyncio.get_running_loop().create_task(
                    self.manager.destroy(POOL_CALLER, msb.id, reason="pool-dead")))
                self._dead = {t for t in self._dead if not t.done()}
        return None

    async def _attach(self, caller: Caller, msb, host_dir: str) -> bool:
        """Mount the request's host directory at msb's /workspace (sandbox/live_mounts.py)
        and point the file API at it; on failure the sandbox is destroyed and False says
        go cold (whose own attempt reports the error)."""
        from corral.sandbox.live_mounts import attach_workspace

        try:
            await self.manager.run_blocking(attach_workspace, msb.sandbox, host_dir,
                                            tenant=caller.tenant)
        except CorralError as exc:
            log.warning("pool %s: attaching %s failed (%s); creating cold", msb.pool,
                        host_dir, exc)
            await self.manager.destroy(POOL_CALLER, msb.id, reason="pool-acquire-failed")
            return False
        st = os.stat(host_dir)  # as a cold create's file API: the directory's owner
        msb.workspace = Workspace(host_dir, st.st_uid, st.st_gid)
        return True

    async def stop(self) -> None:
        """Stop filling (a fill under way finishes and is kept, so nothing leaks), then
        destroy every ready sandbox."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        for name, ready in self.ready.items():
            while ready:
                msb = ready.popleft()
                try:
                    await self.manager.destroy(POOL_CALLER, msb.id, reason="pool-drain")
                except Exception:  # noqa: BLE001 - the others still drain; the sweep has it
                    log.exception("pool %s: destroying ready sandbox %s failed", name, msb.id)

    def _keepable(self, spec: SandboxSpec) -> bool:
        """Live restore is on and would keep a sandbox of spec (module docstring)."""
        manager = self.manager
        return (manager.live_restore is not None and spec.backend == "native"
                and not manager.not_kept_because(spec, None))

    def _most_short(self) -> PoolSpec | None:
        """The pool furthest under its size (None: all full)."""
        best, short = None, 0
        for pool in self.pools.values():
            missing = pool.size - len(self.ready[pool.name])
            if missing > short:
                best, short = pool, missing
        return best

    def _must_wait(self) -> bool:
        """Live creates are under way (spawning, or a pool hit writing its record), or the
        daemon is at max_sandboxes."""
        manager = self.manager
        live = manager.pending - self._filling + manager.creating
        return live > 0 or (
            manager.held + manager.pending >= manager.limits.max_sandboxes)

    async def _refill(self) -> None:
        """One fill at a time, each start at least 1/pool_refill_per_s after the end of
        the one before; waits while live creates spawn."""
        failures = 0
        while not self._stopping:
            pool = self._most_short()
            if pool is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._must_wait():
                await asyncio.sleep(BACKOFF_S)
                continue
            try:
                await self._fill(pool)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a failed fill must not end the pools
                failures += 1
                log.error("pool %s: starting a ready sandbox failed: %s", pool.name, exc)
                await asyncio.sleep(min(MAX_FAILURE_WAIT_S, 2.0 ** (failures - 1)))
            await asyncio.sleep(self._interval_s)

    async def _fill(self, pool: PoolSpec) -> None:
        """Spawn one ready sandbox for pool through the cold path, and record it."""
        spec, values = pool.birth()
        keepable = self._keepable(spec)
        if keepable:  # outlives the daemon once acquired; dies with it while ready
            spec = dataclasses.replace(spec, die_with_parent=False)
        self._filling += 1
        try:
            msb = await self.manager.launch(POOL_TENANT, spec, expires_in=float("inf"),
                                            secret_values=values)
        finally:
            self._filling -= 1
        del values
        if keepable:
            self.manager.live_restore.hold_ready(msb.sandbox)
        msb.pool = pool.name
        # recorded before it can be handed out: its fill precedes its create in the log
        await self.audit.record("sandbox.pool.fill", tenant=POOL_TENANT, peer="pool",
                                sandbox_id=msb.id,
                                detail={"pool": pool.name, "policy_digest": msb.policy_digest,
                                        "backend": pool.template.backend,
                                        "init_pid": msb.sandbox.init_pid})
        self.ready[pool.name].append(msb)
