"""Tenant policy as code: policy files under version control, their digest, check and diff.

A policy file is TOML with the daemon config's policy tables and nothing else: ``[policy]``
(every tenant that is not an operator) and ``[tenants.NAME]`` (that tenant, on top of
``[policy]``), with the keys runtime/policy.py knows. ``policy_file`` in the daemon config
names one file, or a directory whose ``*.toml`` files are read in name order (one
``[policy]`` among them at most, each tenant in one file only). Tokens are secrets and stay
in the daemon config: a policy file that holds one is refused.

The *policy digest* names the policy in force: ``sha256:`` and the hex sha256 of the
canonical JSON (sorted keys, no spaces) of ``{"policy": P, "tenants": {NAME: P, ...}}``,
where each P is `TenantPolicy.describe()` (tuples as lists) of the *effective* policy,
defaults filled in. Two files that mean the same policy have the same digest. The daemon
writes it into every audit record's detail (``corral.policy``), and a reload (SIGHUP) is a
``policy.reload`` record (old and new digest, what widened) followed at once by a signed
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, fields

from corral.sandbox.errors import InvalidSpec
from corral.sandbox.proxy import parse_rule

from .config import check_tenant
from .policy import PUBLIC, PolicyBook, TenantPolicy, covers, is_public_rule

#: The sandbox TTL a policy file is judged with when no daemon config gives one.
DEFAULT_TTL_S = 3600.0


@dataclass(frozen=True)
class PolicySource:
    """The policy tables read from files, and which files."""

    policy: dict
    tenants: dict
    files: tuple[str, ...]


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".toml"))
        if not names:
            raise InvalidSpec("policy_file", f"{path} is a directory with no *.toml file")
        return [os.path.join(path, n) for n in names]
    if not os.path.exists(path):
        raise InvalidSpec("policy_file", f"{path} does not exist")
    return [path]


def load_source(path: str) -> PolicySource:
    """Read a policy file or directory.

    Raises:
        InvalidSpec: unreadable, not TOML, a key that does not belong in a policy file (a
            token, a daemon setting), a tenant or [policy] defined twice; names file and key.
    """
    policy: dict = {}
    tenants: dict = {}
    policy_from = ""
    files = _files_of(path)
    for file_path in files:
        try:
            with open(file_path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise InvalidSpec("policy_file", f"{file_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidSpec("policy_file", f"{file_path}: {exc}") from None
        for key, value in raw.items():
            if key == "policy":
                if not isinstance(value, dict):
                    raise InvalidSpec("policy_file", f"{file_path}: [policy] must be a table")
                if policy_from:
                    raise InvalidSpec("policy_file", f"{file_path}: [policy] is already set "
                                                     f"in {policy_from}")
                policy, policy_from = dict(value), file_path
            elif key == "tenants":
                if not isinstance(value, dict):
                    raise InvalidSpec("policy_file", f"{file_path}: [tenants] must hold "
                                                     "[tenants.NAME] tables")
                for name, table in value.items():
                    check_tenant(name, f"{file_path}: tenants")
                    if not isinstance(table, dict):
                        raise InvalidSpec("policy_file",
                                          f"{file_path}: [tenants.{name}] must be a table")
                    if "token" in table:
                        raise InvalidSpec("policy_file", f"{file_path}: tenants.{name}.token: "
                                          "tokens are secrets; keep them in the daemon "
                                          "config, not in a policy file under version control")
                    if name in tenants:
                        raise InvalidSpec("policy_file", f"{file_path}: [tenants.{name}] is "
                                                         "already set in another policy file")
                    tenants[name] = dict(table)
            else:
                raise InvalidSpec("policy_file", f"{file_path}: {key!r} does not belong in a "
                                                 "policy file (only [policy] and "
                                                 "[tenants.NAME] tables)")
    return PolicySource(policy, tenants, tuple(files))


def build_book(source: PolicySource, default_ttl_s: float = DEFAULT_TTL_S,
               operators=("local",)) -> PolicyBook:
    """The PolicyBook of a source (as the daemon builds it from its config)."""
    return PolicyBook.from_config(source.policy, source.tenants, default_ttl_s, operators)


def load_book(path: str, default_ttl_s: float = DEFAULT_TTL_S, operators=("local",)
              ) -> PolicyBook:
    """Read and validate a policy file or directory (what `corral policy check` does).

    Raises:
        InvalidSpec: naming the file, or the key as policy.KEY / tenants.NAME.KEY.
    """
    source = load_source(path)
    try:
        return build_book(source, default_ttl_s, operators)
    except InvalidSpec as exc:
        where = source.files[0] if len(source.files) == 1 else path
        raise InvalidSpec("policy_file", f"{where}: {exc}") from None


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def describe(policy: TenantPolicy) -> dict:
    return {k: _plain(v) for k, v in policy.describe().items()}


def policy_digest(book: PolicyBook) -> str:
    """The digest of the policy in force (format in the module docstring)."""
    doc = {"policy": describe(book.default),
           "tenants": {name: describe(p) for name, p in sorted(book.per_tenant.items())}}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- diff --------------------------------------------------------------------------------------

#: field -> (the TOML key, "ask for" for a per-sandbox limit / "hold" for a quota)
_LIMITS = {
    "max_memory_bytes": ("max_memory", "limit"), "max_pids": ("max_pids", "limit"),
    "max_cpus": ("max_cpus", "limit"), "max_tmp_bytes": ("max_tmp", "limit"),
    "max_ttl_s": ("max_ttl", "limit"), "max_priority": ("max_priority", "limit"),
    "max_sandboxes": ("max_sandboxes", "quota"), "max_sessions": ("max_sessions", "quota"),
    "max_running_tasks": ("max_running_tasks", "quota"),
    "max_queued_tasks": ("max_queued_tasks", "quota"),
    "max_request_rate": ("max_request_rate", "quota"),
    "max_exposed_ports": ("max_exposed_ports", "quota"),
    "max_snapshots": ("max_snapshots", "quota"),
    "max_snapshot_bytes": ("max_snapshot_size", "quota"),
}


def _show(field_name: str, value) -> str:
    if value is None:
        return "unlimited"
    if field_name.endswith("_bytes"):
        for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if value >= factor and value % factor == 0:
                return f"{value // factor}{unit}"
        return f"{value} bytes"
    if field_name == "max_ttl_s":
        return f"{value:g}s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _net_widenings(who: str, old: TenantPolicy, new: TenantPolicy) -> list[str]:
    if new.allow_net is None:
        return [] if old.allow_net is None else [f"{who} may now reach any destination "
                                                 "(allow_net: no limit)"]
    if old.allow_net is None:
        return []
    lines = []
    old_rules = [parse_rule(g) for g in old.allow_net if g != PUBLIC]
    old_public = PUBLIC in old.allow_net
    if PUBLIC in new.allow_net and not old_public:
        lines.append(f"{who} may now reach any public destination (allow_net: public)")
    for text in new.allow_net:
        if text == PUBLIC:
            continue
        rule = parse_rule(text)
        if any(covers(g, rule) for g in old_rules) or (old_public and is_public_rule(rule)):
            continue
        lines.append(f"{who} may now reach {text}")
    return lines


def _host_dir_widenings(who: str, old: TenantPolicy, new: TenantPolicy) -> list[str]:
    if old.host_dirs is None:
        return []
    if new.host_dirs is None:
        return [f"{who} may now show any host directory at /workspace (host_dirs: no limit)"]

    def covered(path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in old.host_dirs)

    return [f"{who} may now show host directory {d} at /workspace"
            for d in new.host_dirs if not covered(d)]


def tenant_widenings(who: str, old: TenantPolicy, new: TenantPolicy) -> list[str]:
    """What `new` allows that `old` did not, one line per widening."""
    lines = [f"{who} may now use seccomp profile {p!r}"
             for p in new.profiles if p not in old.profiles]
    lines += _net_widenings(who, old, new)
    lines += _host_dir_widenings(who, old, new)
    for f in fields(TenantPolicy):
        if f.name not in _LIMITS:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a is None or (b is not None and b <= a):
            continue
        key, kind = _LIMITS[f.name]
        verb = "ask for" if kind == "limit" else "hold"
        lines.append(f"{who} may now {verb} {key} = {_show(f.name, b)} (was {_show(f.name, a)})")
    return lines


def widenings(old: PolicyBook, new: PolicyBook) -> list[str]:
    """Every way `new` allows more than `old`: new tenants, profiles, network rules, each
    limit and each quota, for each tenant and for the default of every other tenant."""
    lines = tenant_widenings("the default policy (every other tenant)", old.default,
                             new.default)
    for name in sorted(new.per_tenant):
        before = old.per_tenant.get(name)
        if before is None:
            lines.append(f"tenant {name} is new: it gets a policy of its own")
            before = old.default  # what it had: the default policy
        lines += tenant_widenings(f"tenant {name}", before, new.per_tenant[name])
    for name in sorted(set(old.per_tenant) - set(new.per_tenant)):
        # it falls back to the default policy: wider wherever the default is wider
        lines += [f"{line} (its own table was removed)" for line in
                  tenant_widenings(f"tenant {name}", old.per_tenant[name], new.default)]
    return lines
