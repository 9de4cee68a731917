"""SandboxSpec: the validated, immutable description of one sandbox (units in every name)."""

from __future__ import annotations

import copy
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath

from .errors import InvalidSpec

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
#: The largest byte count or limit a spec takes (cgroup page counters, tmpfs sizes and
#: rlimits all hold it; int64 fields on the wire too).
MAX_QUANTITY = 1 << 62
#: The highest cpu_weight (cgroup v2's cpu.weight range is 1..10000).
MAX_CPU_WEIGHT = 10_000

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

#: Names in the sandbox's /dev that Corral makes itself; a granted device may not take one.
_DEV_MANAGED = frozenset({"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx",
                          "shm", "fd", "stdin", "stdout", "stderr"})
#: The kernel's MAX_ARG_STRLEN: the longest "NAME=value" string execve takes.
MAX_ENV_ENTRY_BYTES = 128 * KiB
#: Environment of a sandbox's commands in all (argv and the runtime's own variables share
#: the rest of execve's room).
MAX_ENV_BYTES = 1 * MiB
#: Sandbox backends a spec may name.
BACKENDS = ("native", "docker")
# Paths inside the sandbox that Corral itself builds; a user mount may not replace them.
RESERVED_TARGETS = ("/", "/proc", "/dev", "/tmp", "/workspace", "/etc")


#: Variables one command (or a spec) may set; execve's room bounds their bytes anyway.
MAX_ENV_VARS = 256
#: Arguments of one command, and their bytes in all.
MAX_ARGS = 4096
MAX_ARGV_BYTES = 1 * MiB


def check_env(pairs: Iterable[tuple[str, str]], field_name: str = "env") -> None:
    """Variables a command may be given: at most MAX_ENV_VARS, names a shell takes, no NUL.

    The one check for a spec's env and an exec's (a sandbox's or a task's).

    Raises:
        InvalidSpec: naming field_name.
    """
    pairs = list(pairs)
    if len(pairs) > MAX_ENV_VARS:
        raise InvalidSpec(field_name, f"more than {MAX_ENV_VARS} variables")
    for key, value in pairs:
        if not _ENV_NAME_RE.match(key):
            raise InvalidSpec(field_name, f"{key!r} is not a valid variable name")
        if "\0" in value:
            raise InvalidSpec(field_name, f"value of {key} contains a NUL byte")


def check_argv(argv: Iterable[str], field_name: str = "argv") -> None:
    """A command line execve takes: a program, at most MAX_ARGS arguments and
    MAX_ARGV_BYTES in all, no NUL. The one check for an exec's argv and a task's.

    Raises:
        InvalidSpec: naming field_name.
    """
    argv = list(argv)
    if not argv or not argv[0]:
        raise InvalidSpec(field_name, "the command is empty")
    if len(argv) > MAX_ARGS or sum(len(a) for a in argv) > MAX_ARGV_BYTES:
        raise InvalidSpec(field_name, f"more than {MAX_ARGS} arguments or 1 MiB in all")
    if any("\0" in arg for arg in argv):
        raise InvalidSpec(field_name, "an argument contains a NUL byte")


def parse_size(value: str | int, field_name: str) -> int:
    """Parse '512M', '2G', '64KiB' or a plain byte count into bytes (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise InvalidSpec(field_name, f"{value} must be a positive number of bytes")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise InvalidSpec(field_name, f"{value!r} is not a size; use e.g. 512M or 2G")
    number = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if number < 1:
        raise InvalidSpec(field_name, f"{value!r} must be at least 1 byte")
    return int(number)


def parse_duration(value: str | float | int, field_name: str) -> float:
    """Parse '30s', '2h', '1m30s', '500ms' or plain seconds into seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _DURATION_RE.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise InvalidSpec(
                    field_name, f"{value!r} is not a duration; use e.g. 30s, 5m, 2h or 1m30s"
                ) from None
    if seconds <= 0:
        raise InvalidSpec(field_name, f"{value!r} must be longer than zero")
    return seconds


@dataclass(frozen=True)
class BindMount:
    """A host path made visible inside the sandbox."""

    source: str  # absolute host path
    target: str  # absolute path inside the sandbox
    writable: bool = False

    @classmethod
    def parse(cls, text: str, writable: bool) -> BindMount:
        """Parse 'PATH' (same path inside) or 'HOST:INSIDE'."""
        field_name = "rw" if writable else "ro"
        source, sep, target = text.partition(":")
        if not sep:
            target = source
        if not source or not target:
            raise InvalidSpec(field_name, f"{text!r} is not PATH or HOST_PATH:SANDBOX_PATH")
        return cls(os.path.abspath(source), target, writable)


#: The longest secret name (it is also the variable that holds the placeholder).
MAX_SECRET_NAME = 128
#: Secrets one sandbox may be given, and hosts one secret may be bound to.
MAX_SECRETS = 64
MAX_SECRET_HOSTS = 64


@dataclass(frozen=True)
class SecretBinding:
    """A secret the sandbox uses by name: inside, the variable NAME holds a placeholder;
    the egress proxy puts the real value in its place only toward these hosts (HOST or
    *.DOMAIN, canonical after validation). The value itself is never part of a spec."""

    name: str
    hosts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SecretBinding:
        """Parse 'NAME@HOST[,HOST...]' (the --secret flag).

        Raises:
            InvalidSpec: on field "secrets".
        """
        name, sep, hosts = text.partition("@")
        if not sep or not name or not hosts:
            raise InvalidSpec("secrets", f"{text!r} is not NAME@HOST[,HOST...]")
        return cls(name, tuple(h for h in hosts.split(",")))

    def checked(self) -> SecretBinding:
        """This binding validated, its hosts canonical (lower case, sorted, once each).

        Raises:
            InvalidSpec: on field "secrets", naming the secret and what is wrong.
        """
        from .proxy import normalize_name

        if not isinstance(self.name, str) or not _ENV_NAME_RE.match(self.name) \
                or len(self.name) > MAX_SECRET_NAME:
            raise InvalidSpec("secrets", f"{str(self.name)[:140]!r} is not a variable name "
                                         f"of at most {MAX_SECRET_NAME} characters")
        if isinstance(self.hosts, str) or not self.hosts \
                or len(self.hosts) > MAX_SECRET_HOSTS:
            raise InvalidSpec("secrets", f"{self.name}: bind it to 1 to {MAX_SECRET_HOSTS} "
                                         "hosts (HOST or *.DOMAIN)")
        hosts = set()
        for host in self.hosts:
            text = host if isinstance(host, str) else ""
            wildcard = text.startswith("*.")
            name = normalize_name(text[2:] if wildcard else text)
            if name is None or "*" in text[2 if wildcard else 0:]:
                raise InvalidSpec("secrets", f"{self.name}: {text[:260]!r} is not HOST or "
                                             "*.DOMAIN")
            hosts.add(("*." if wildcard else "") + name)
        return SecretBinding(self.name, tuple(sorted(hosts)))


@dataclass(frozen=True)
class SandboxSpec:
    """What a sandbox may use and see. Frozen; validated on construction.

    Sizes are bytes, durations seconds, CPU in cores. None means "no limit" where allowed.
    """

    #: Seccomp profile: "default", "unconfined", or a path to a Docker-format JSON file.
    profile: str = "default"
    #: cgroup memory limit in bytes; swap is always disabled.
    memory_bytes: int = 512 * MiB
    #: cgroup pids limit (processes + threads).
    pids_max: int = 256
    #: CPU quota in cores (0.5 = half a core), None for no quota.
    cpus: float | None = 1.0
    #: Wall-clock limit of each command in seconds, None for none.
    timeout_s: float | None = None
    #: Host directory mounted writable at /workspace; None = a fresh temporary directory.
    workspace: str | None = None
    #: Size cap of /tmp and /dev/shm together, in bytes (an image root and the Docker
    #: backend give each its own).
    tmp_bytes: int = 64 * MiB
    #: RLIMIT_NOFILE (open descriptors per process).
    nofile: int = 1024
    #: RLIMIT_FSIZE in bytes: the largest file a process may write.
    fsize_bytes: int = 1 * GiB
    #: Extra host paths: read-only and writable bind mounts.
    binds: tuple[BindMount, ...] = ()
    #: Environment of commands (on top of a clean PATH/HOME/LANG/TERM base).
    env: tuple[tuple[str, str], ...] = ()
    #: Hostname inside the UTS namespace.
    hostname: str = "corral"
    #: First host uid/gid of the sandbox's id range (root inside maps to it). None: the
    #: sandbox takes its own range of Corral's pool when it starts (sandbox/ids.py), and
    #: its ``spec`` then names it; an unprivileged caller's root inside is the caller.
    uid_base: int | None = None
    #: Number of ids mapped (0..uid_count-1 inside).
    uid_count: int = 65536
    #: Kill the sandbox when the process that created it dies.
    die_with_parent: bool = True
    #: Free-form labels carried into the audit trail.
    labels: tuple[tuple[str, str], ...] = field(default=())
    #: Egress allow-list: HOST[:PORT], *.DOMAIN[:PORT], IP[:PORT], CIDR[:PORT] (canonical
    #: form). Empty = loopback only, no link at all (sandbox/proxy.py has the rules).
    allow_net: tuple[str, ...] = ()
    #: Host device nodes granted to the sandbox (e.g. a task's accelerator), each shown
    #: read-write at /dev/<its name>.
    devices: tuple[str, ...] = ()
    #: Where the sandbox runs: "native" (Corral's own kernel setup) or "docker" (an engine).
    backend: str = "native"
    #: Root filesystem: an image REF the local store resolves (sandbox/images), mounted as
    #: an overlay of its layers with a per-sandbox upper layer on a tmpfs capped at
    #: tmp_bytes. Empty: the host's /usr (and a few /etc entries) read-only, as always.
    image: str = ""
    #: Secrets by name and the hosts each may reach (values live outside the spec: see
    #: sandbox/secrets.py). Each implies allow_net for its hosts on ports 443 and 80.
    secrets: tuple[SecretBinding, ...] = ()
    #: Start from this snapshot's filesystem state (sandbox/state): its id ("snap-" + 12
    #: hex, resolved by the caller from a name). Its layers are read-only lowers under
    #: upper layers of the sandbox's own; it names the image, so `image` must be empty or
    #: the same. Empty: a fresh sandbox.
    snapshot: str = ""
    #: With `workspace`: show that host directory through a copy-on-write overlay whose
    #: changes (sandbox/state/changes.py) outlive the sandbox until applied or discarded;
    #: the host directory is not written while the sandbox runs.
    workspace_cow: bool = False
    #: Relative CPU weight against other sandboxes when CPUs are contended, on cgroup v2's
    #: scale (1..10000, 100 = an ordinary sandbox; v1 writes cpu.shares in proportion).
    #: None: the ordinary weight. Deep tasks get the daemon's task_cpu_weight, so the
    #: work of real-time sessions goes first.
    cpu_weight: int | None = None
    #: Batch work (a deep task's sandbox; the daemon sets it for every task): the sandbox's
    #: cgroup is made in `corral-batch/`, beside `corral/` at the top of the hierarchy, whose
    #: own weight (the daemon's task_cpu_weight) bounds all batch work together against the
    #: sessions, the daemon and the rest of the host; cpu_weight then orders the sandbox
    #: among the batch ones (sandbox/cgroups.py). The docker backend ignores it.
    batch: bool = False

    def __post_init__(self):
        self._check_choices()
        self._check_state()
        self._check_quantities()
        self._check_placement()
        self._check_binds()
        self._check_devices()
        check_env(self.env)
        self._check_env_size()
        if self.secrets:
            self._check_secrets()
        if self.allow_net:
            self._canonical_allow_net()

    def _check_choices(self) -> None:
        """The named choices: profile, image and backend (and which go together)."""
        if not isinstance(self.profile, str) or not self.profile:
            raise InvalidSpec("profile", "must name a profile or a JSON file")
        if not isinstance(self.image, str) or "\0" in self.image:
            raise InvalidSpec("image", "must be an image REF (or empty for the host's /usr)")
        if not isinstance(self.batch, bool):
            raise InvalidSpec("batch", f"must be true or false, not {self.batch!r}")
        if self.backend not in BACKENDS:
            raise InvalidSpec("backend", f"{self.backend!r} is not a backend; use "
                                         f"{' or '.join(BACKENDS)}")

    def _check_state(self) -> None:
        """Where the filesystem state comes from: a snapshot, a copy-on-write workspace."""
        if not isinstance(self.snapshot, str) or (
                self.snapshot and not re.fullmatch(r"snap-[0-9a-f]{12}", self.snapshot)):
            raise InvalidSpec("snapshot", f"{str(self.snapshot)[:80]!r} is not a snapshot id "
                                          f"(snap- and 12 hex digits)")
        if not isinstance(self.workspace_cow, bool):
            raise InvalidSpec("workspace_cow", "must be true or false")
        if (self.snapshot or self.workspace_cow) and self.backend != "native":
            raise InvalidSpec("snapshot" if self.snapshot else "workspace_cow",
                              "only the native backend has snapshots and copy-on-write "
                              "workspaces")
        if self.workspace_cow and not self.workspace:
            raise InvalidSpec("workspace_cow", "needs a host directory (workspace) to show")
        if self.snapshot and self.workspace:
            raise InvalidSpec("workspace", "a sandbox from a snapshot gets the snapshot's "
                                           "workspace; drop the workspace directory")

    def _check_quantities(self) -> None:
        """Byte counts, counts, cores and seconds: positive, and within what the kernel holds."""
        for name in ("memory_bytes", "pids_max", "tmp_bytes", "nofile", "fsize_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidSpec(name, f"{value!r} must be a positive integer")
            if value > MAX_QUANTITY:
                # past what cgroup counters, tmpfs and rlimits hold (and int64 on the wire)
                raise InvalidSpec(name, f"{value} is over the limit of {MAX_QUANTITY} (2**62)")
        if self.memory_bytes < 8 * MiB:
            raise InvalidSpec("memory_bytes", f"{self.memory_bytes} is below the 8M minimum")
        if self.pids_max < 2:
            raise InvalidSpec("pids_max", f"{self.pids_max} is below 2 (init + one command)")
        if self.cpus is not None and not (0.01 <= float(self.cpus) <= 4096):
            raise InvalidSpec("cpus", f"{self.cpus!r} must be between 0.01 and 4096 cores")
        w = self.cpu_weight
        if w is not None and (not isinstance(w, int) or isinstance(w, bool)
                              or not 1 <= w <= MAX_CPU_WEIGHT):
            raise InvalidSpec("cpu_weight", f"{w!r} must be a whole number from 1 to "
                                            f"{MAX_CPU_WEIGHT} (100 = an ordinary sandbox)")
        if self.timeout_s is not None and not float(self.timeout_s) > 0:
            raise InvalidSpec("timeout_s", f"{self.timeout_s!r} must be longer than zero")

    def _check_placement(self) -> None:
        """Where it lives on the host: the workspace directory, host name and id range."""
        if self.workspace is not None:
            if not os.path.isdir(self.workspace):
                raise InvalidSpec("workspace", f"{self.workspace!r} is not an existing directory")
            object.__setattr__(self, "workspace", os.path.realpath(self.workspace))
        if not _HOSTNAME_RE.match(self.hostname):
            raise InvalidSpec("hostname", f"{self.hostname!r} is not a valid host name")
        if self.uid_base is not None and not (
                isinstance(self.uid_base, int) and 1 <= self.uid_base
                and self.uid_base + self.uid_count <= 2**32 - 1):
            raise InvalidSpec("uid_base", "root inside must map to an unprivileged host id (>0)")
        if self.uid_count < 1:
            raise InvalidSpec("uid_count", "must map at least one id")

    def _check_binds(self) -> None:
        """Bind targets: absolute, not Corral's own paths, each once; sources exist."""
        seen = set()
        for b in self.binds:
            field_name = "rw" if b.writable else "ro"
            target = PurePosixPath(b.target)
            if not target.is_absolute() or ".." in target.parts:
                raise InvalidSpec(field_name, f"{b.target!r} must be an absolute path without '..'")
            norm = str(target)
            if any(norm == r or (r != "/" and norm.startswith(r + "/") and r != "/tmp"
                                 and r != "/workspace")
                   for r in RESERVED_TARGETS):
                raise InvalidSpec(field_name, f"{b.target!r} is managed by Corral itself")
            if norm in seen:
                raise InvalidSpec(field_name, f"{b.target!r} is mounted twice")
            seen.add(norm)
            if not os.path.exists(b.source):
                raise InvalidSpec(field_name, f"{b.source!r} does not exist on the host")

    def _check_devices(self) -> None:
        """Granted devices: host character or block nodes whose names /dev has free."""
        names = set()
        for dev in self.devices:
            name = os.path.basename(dev)
            if not os.path.isabs(dev) or name in names or name in _DEV_MANAGED:
                raise InvalidSpec("devices", f"{dev!r} must be an absolute path whose name is "
                                             "not already in the sandbox's /dev")
            names.add(name)
            try:
                st = os.stat(dev)
            except OSError:
                raise InvalidSpec("devices", f"{dev!r} does not exist on the host") from None
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise InvalidSpec("devices", f"{dev!r} is not a character or block device")

    def _check_env_size(self) -> None:
        """What execve takes: each "NAME=value" string, and all of them together."""
        for key, value in self.env:
            if len(key) + len(value.encode()) + 2 > MAX_ENV_ENTRY_BYTES:
                # execve refuses one longer string (E2BIG): every command would fail
                raise InvalidSpec("env", f"{key}=... is {len(value.encode())} bytes; one "
                                         f"variable holds at most {MAX_ENV_ENTRY_BYTES - 2} "
                                         "bytes with its name")
        if sum(len(k) + len(v.encode()) + 2 for k, v in self.env) > MAX_ENV_BYTES:
            raise InvalidSpec("env", f"the variables hold more than {MAX_ENV_BYTES} bytes in all")

    def _check_secrets(self) -> None:
        """Secret bindings: valid, each name once and not also in env, sorted by name; the
        hosts they are bound to join allow_net on 443 and 80 (a secret implies the grant,
        so the policy digest shows it)."""
        if self.backend != "native":
            raise InvalidSpec("secrets", "only the native backend has the egress proxy that "
                                         "puts secrets in; use --backend native")
        if isinstance(self.secrets, (str, SecretBinding)) or len(self.secrets) > MAX_SECRETS:
            raise InvalidSpec("secrets", f"must be a list of at most {MAX_SECRETS} bindings")
        bindings = [b.checked() if isinstance(b, SecretBinding) else None
                    for b in self.secrets]
        if None in bindings:
            raise InvalidSpec("secrets", "each entry must be a SecretBinding(name, hosts)")
        names = [b.name for b in bindings]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidSpec("secrets", f"{twice[0]} is bound twice; give all its hosts in "
                                         "one binding")
        clash = sorted(set(names) & {k for k, _ in self.env})
        if clash:
            raise InvalidSpec("secrets", f"{clash[0]} is also set in env; the secret's "
                                         "placeholder is that variable")
        object.__setattr__(self, "secrets", tuple(sorted(bindings, key=lambda b: b.name)))
        implied = [f"{h}:{port}" for b in bindings for h in b.hosts for port in (443, 80)]
        object.__setattr__(self, "allow_net", (*self.allow_net, *implied))

    def _canonical_allow_net(self) -> None:
        """The egress rules parsed, canonical and sorted: the same grant always has the
        same policy digest."""
        from .proxy import parse_rule

        if self.backend != "native":
            raise InvalidSpec("allow_net", "only the native backend has an egress proxy; "
                                           "drop --allow-net or use --backend native")
        if isinstance(self.allow_net, str) or len(self.allow_net) > 256:
            raise InvalidSpec("allow_net", "must be a list of at most 256 rules")
        rules = tuple(sorted({str(parse_rule(r)) for r in self.allow_net}))
        object.__setattr__(self, "allow_net", rules)

    @classmethod
    def build(
        cls,
        *,
        profile: str = "default",
        memory: str | int | None = None,
        pids: int | str | None = None,
        cpus: float | str | None = None,
        timeout: str | float | None = None,
        workspace: str | None = None,
        ro: Iterable[str] = (),
        rw: Iterable[str] = (),
        env: Mapping[str, str] | Iterable[str] = (),
        tmp_size: str | int | None = None,
        hostname: str | None = None,
        backend: str | None = None,
        allow_net: Iterable[str] = (),
        image: str | None = None,
        secrets: Iterable[str | SecretBinding] = (),
    ) -> SandboxSpec:
        """Build a spec from user-facing strings (CLI flags, config, API fields)."""
        kw: dict = {"profile": profile}
        if backend is not None:
            kw["backend"] = backend
        if memory is not None:
            kw["memory_bytes"] = parse_size(memory, "memory")
        if pids is not None:
            try:
                kw["pids_max"] = int(pids)
            except ValueError:
                raise InvalidSpec("pids", f"{pids!r} is not a whole number") from None
        if cpus is not None:
            try:
                kw["cpus"] = float(cpus)
            except ValueError:
                raise InvalidSpec("cpus", f"{cpus!r} is not a number of cores, e.g. 0.5") from None
        if timeout is not None:
            kw["timeout_s"] = parse_duration(timeout, "timeout")
        if workspace is not None:
            kw["workspace"] = workspace
        if tmp_size is not None:
            kw["tmp_bytes"] = parse_size(tmp_size, "tmp_size")
        if hostname is not None:
            kw["hostname"] = hostname
        kw["binds"] = tuple(BindMount.parse(p, False) for p in ro) + tuple(
            BindMount.parse(p, True) for p in rw
        )
        pairs = []
        items = env.items() if isinstance(env, Mapping) else env
        for item in items:
            if isinstance(item, str):
                key, sep, value = item.partition("=")
                if not sep:
                    raise InvalidSpec("env", f"{item!r} is not KEY=VALUE")
            else:
                key, value = item
            pairs.append((key, value))
        kw["env"] = tuple(pairs)
        kw["allow_net"] = tuple(allow_net)
        kw["secrets"] = tuple(SecretBinding.parse(b) if isinstance(b, str) else b
                              for b in secrets)
        if image:
            kw["image"] = image
        return cls(**kw)

    def to_fields(self) -> dict:
        """The fields that differ from the defaults, JSON-able (lists for tuples): the
        durable form of a spec (a task's row, an attempt's plan); from_fields reads it."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.name == "binds":
                value = [[b.source, b.target, b.writable] for b in value]
            elif f.name == "secrets":
                value = [[b.name, list(b.hosts)] for b in value]
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_fields(cls, stored: Mapping) -> SandboxSpec:
        """A spec from to_fields()'s form, validated again. It is also the form tasks kept
        before they carried a spec (SandboxSpec keyword arguments, lists for tuples), so
        rows written then still load.

        Raises:
            InvalidSpec: a field is unknown or its value invalid.
        """
        kw = dict(stored)
        unknown = kw.keys() - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidSpec(sorted(unknown)[0], "is not a sandbox spec field")
        if "binds" in kw:
            kw["binds"] = tuple(BindMount(s, t, bool(w)) for s, t, w in kw["binds"])
        if "secrets" in kw:
            kw["secrets"] = tuple(SecretBinding(str(n), tuple(h)) for n, h in kw["secrets"])
        for name in ("env", "labels"):
            if name in kw:
                kw[name] = tuple((str(k), str(v)) for k, v in kw[name])
        for name in ("allow_net", "devices"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def with_ids(self, uid_base: int, uid_count: int) -> SandboxSpec:
        """This spec with its host id range fixed (by the sandbox that starts it). Nothing
        else is validated again: a bind source that vanished since is the start's error.

        Raises:
            InvalidSpec: the range maps root inside to host root or past the last id.
        """
        if not (1 <= uid_base and uid_count >= 1 and uid_base + uid_count <= 2**32 - 1):
            raise InvalidSpec("uid_base", "root inside must map to an unprivileged host id (>0)")
        fixed = copy.copy(self)
        object.__setattr__(fixed, "uid_base", uid_base)
        object.__setattr__(fixed, "uid_count", uid_count)
        return fixed

    def environment(self) -> list[str]:
        """The complete environment of a command: a clean base plus the spec's variables."""
        base = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/workspace",
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
            "USER": "root",
            "HOSTNAME": self.hostname,
            "TMPDIR": "/tmp",
            # The agent protocol helper: `import corral_agent` works in every sandbox.
            "PYTHONPATH": "/opt/corral/lib",
        }
        if self.allow_net:
            # Proxy-aware programs use the explicit proxy; the rest are steered anyway.
            from .proxy import GATEWAY, PROXY_PORT

            url = f"http://{GATEWAY}:{PROXY_PORT}"
            for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
                base[key] = url
            base["no_proxy"] = base["NO_PROXY"] = "localhost,127.0.0.1,::1"
        base.update(dict(self.env))
        return [f"{k}={v}" for k, v in base.items()]
