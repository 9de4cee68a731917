"""The daemon's per-tenant secret store: where the values of `--secret NAME` come from.

A client names a secret in a sandbox spec (spec.SecretBinding) and never sends its value;
the daemon looks the value up here, for the tenant that asked, when it creates the
sandbox, and hands it to the sandbox beside the spec (sandbox/secrets.py). The rules:

1. Two sources, both set by the operator in the daemon's config:

       [secrets]
       dir = "/etc/corral/secrets"        # files DIR/TENANT/NAME
       [secrets.tenants.acme]
       OPENAI_API_KEY = { file = "/etc/corral/acme-openai" }
       GITHUB_TOKEN = { value = "..." }   # only in a config file of mode 0600

   A tenant's own table wins over the directory for the same name.
2. A file must be a regular file (no symlink) owned by the daemon's user (or root), of
   mode 0600 or stricter: one that its group or others may read is refused, naming the
   path and its mode. Its value is its content, less one trailing newline.
3. Files are read at each lookup, so replacing one rotates the secret for the sandboxes
   created after (running sandboxes keep the value they started with, until a restart of
   a daemon with live restore on: it reads each kept sandbox's values here again, and a
   sandbox whose secret is gone from the store by then is killed and reported).
4. No value is ever logged, put in an error message or shown by `repr`: errors name the
   tenant, the secret and the path.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from corral.sandbox.errors import FailedPrecondition, InvalidSpec, NotFound

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: The largest secret value read from a file (a key, a token, a small JSON credential).
MAX_VALUE_BYTES = 64 * 1024


class SecretUnavailable(FailedPrecondition):
    """A secret's file exists but may not be used (its mode, owner or type)."""


@dataclass(frozen=True)
class _Source:
    """Where one value lives: a file path, or the config itself (value, never repr'd)."""

    path: str = ""
    value: bytes = field(default=b"", repr=False)
    #: For an inline value: the config file it came from (a deep task's attempt reads it
    #: again there, see locate).
    config: str = ""


class SecretStore:
    """Values of secrets by tenant and name (see the module's rules)."""

    def __init__(self, directory: str | None = None,
                 tenants: Mapping[str, Mapping[str, _Source]] | None = None):
        self.directory = directory
        self._tenants = {t: dict(entries) for t, entries in (tenants or {}).items()}

    def __repr__(self) -> str:
        return f"SecretStore(dir={self.directory!r}, tenants={sorted(self._tenants)})"

    @classmethod
    def from_config(cls, section: Mapping | None, config_path: str | None = None) -> SecretStore:
        """The store of a config's [secrets] table (None or {}: an empty store).

        Args:
            config_path: the file the table came from; inline values need it to be
                readable by its owner only.

        Raises:
            InvalidSpec: naming the key (secrets.dir, secrets.tenants.T.NAME) at fault.
        """
        section = dict(section or {})
        directory = section.pop("dir", None)
        tenants = section.pop("tenants", {}) or {}
        if section:
            raise InvalidSpec(f"secrets.{sorted(section)[0]}", "is not a key of [secrets] "
                                                               "(dir, tenants)")
        if directory is not None and (not isinstance(directory, str)
                                      or not os.path.isabs(directory)):
            raise InvalidSpec("secrets.dir", "must be an absolute directory path")
        parsed: dict[str, dict[str, _Source]] = {}
        for tenant, entries in tenants.items():
            if not _TENANT_RE.match(str(tenant)) or not isinstance(entries, Mapping):
                raise InvalidSpec(f"secrets.tenants.{tenant}", "must be a tenant name with a "
                                                               "table of NAME = {file|value}")
            parsed[tenant] = {name: _source(f"secrets.tenants.{tenant}.{name}", name, entry,
                                            config_path)
                              for name, entry in entries.items()}
        return cls(directory, parsed)

    def names(self, tenant: str) -> list[str]:
        """The secret names a tenant may bind (its table's, and its directory's files)."""
        found = set(self._tenants.get(tenant, {}))
        folder = self._tenant_dir(tenant)
        if folder is not None and os.path.isdir(folder):
            found.update(n for n in os.listdir(folder) if _NAME_RE.match(n))
        return sorted(found)

    def values_for(self, tenant: str, bindings: Iterable) -> dict[str, bytes]:
        """The values of the secrets a spec binds (its SecretBindings), for tenant.

        Raises:
            NotFound: the tenant has no secret of a bound name (named; no value shown).
            SecretUnavailable: its file may not be used (mode, owner, type; path named).
        """
        return {b.name: self.value(tenant, b.name) for b in bindings}

    def value(self, tenant: str, name: str) -> bytes:
        """One secret's value (see values_for for the errors)."""
        source = self._tenants.get(tenant, {}).get(name)
        if source is None:
            folder = self._tenant_dir(tenant)
            path = os.path.join(folder, name) if folder and _NAME_RE.match(name) else None
            if path is None or not os.path.lexists(path):
                raise NotFound(f"secrets: tenant {tenant!r} has no secret {name!r} in the "
                               "daemon's secret store")
            source = _Source(path=path)
        return source.value if source.path == "" else read_secret_file(source.path)

    def locate(self, tenant: str, name: str) -> dict[str, str]:
        """Where one secret's value lives, without the value: {"file": PATH}, or for an
        inline value {"config": CONFIG_PATH, "tenant": T, "name": NAME}. A deep task's
        attempt runs in a process of its own (runtime/tasks/shim.py), maybe after a daemon
        restart: its plan carries this, and value_at reads the value there, at each attempt.

        Raises:
            NotFound, SecretUnavailable: as value (checked now, so a launch fails early).
        """
        self.value(tenant, name)  # the same checks; the value is dropped here
        source = self._tenants.get(tenant, {}).get(name)
        if source is None:
            return {"file": os.path.join(self._tenant_dir(tenant), name)}
        if source.path:
            return {"file": source.path}
        return {"config": source.config, "tenant": tenant, "name": name}

    def _tenant_dir(self, tenant: str) -> str | None:
        if self.directory is None or not _TENANT_RE.match(tenant):
            return None
        return os.path.join(self.directory, tenant)


def _source(key: str, name: str, entry, config_path: str | None) -> _Source:
    """One NAME = {file = PATH} or {value = "..."} entry, checked."""
    if not _NAME_RE.match(str(name)):
        raise InvalidSpec(key, "is not a variable name of at most 128 characters")
    if not isinstance(entry, Mapping) or len(entry) != 1 or not (
            isinstance(entry.get("file"), str) or isinstance(entry.get("value"), str)):
        raise InvalidSpec(key, 'must be { file = "PATH" } or { value = "..." }')
    if "file" in entry:
        if not os.path.isabs(entry["file"]):
            raise InvalidSpec(key, "file must be an absolute path")
        return _Source(path=entry["file"])
    if config_path is None or _loose_mode(os.stat(config_path).st_mode):
        raise InvalidSpec(key, "an inline value needs a config file that only its owner "
                               f"may read (chmod 600 {config_path or 'the config'}), or use "
                               "{ file = PATH }")
    return _Source(value=entry["value"].encode(), config=config_path)


def value_at(where: Mapping[str, str]) -> bytes:
    """The value of a secret that SecretStore.locate placed (rules 2 and 4 as there): a
    file's content, or an inline value read again from its config file, which must still
    be readable by its owner only.

    Raises:
        NotFound: the file, or the entry in the config, is gone.
        SecretUnavailable: the file or the config may not be used (path named).
    """
    if "file" in where:
        return read_secret_file(where["file"])
    import tomllib

    config, tenant, name = where["config"], where["tenant"], where["name"]
    try:
        st = os.stat(config)
        if _loose_mode(st.st_mode) or st.st_uid not in (0, os.geteuid()):
            raise SecretUnavailable(f"secrets: {config} may be read by others now; chmod 600 "
                                    f"{config}")
        with open(config, "rb") as f:
            entry = tomllib.load(f)["secrets"]["tenants"][tenant][name]
        return entry["value"].encode()
    except (OSError, KeyError, TypeError, AttributeError, tomllib.TOMLDecodeError):
        raise NotFound(f"secrets: tenant {tenant!r} has no secret {name!r} in {config} "
                       "any more") from None


def _loose_mode(mode: int) -> bool:
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def read_secret_file(path: str) -> bytes:
    """A secret file's value (rule 2).

    Raises:
        NotFound: the file does not exist.
        SecretUnavailable: not a regular file, a symlink, not ours, or group/world
            readable (the message names the path and mode, never the content).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"secrets: {path} does not exist") from None
    except OSError as exc:
        raise SecretUnavailable(f"secrets: {path}: {os.strerror(exc.errno)} (a secret file "
                                "must be a regular file, not a symlink)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretUnavailable(f"secrets: {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise SecretUnavailable(f"secrets: {path} belongs to uid {st.st_uid}, not to the "
                                    "daemon's user")
        if _loose_mode(st.st_mode):
            raise SecretUnavailable(f"secrets: {path} has mode {stat.S_IMODE(st.st_mode):04o}"
                                    f"; its group or others may read it: chmod 600 {path}")
        if st.st_size > MAX_VALUE_BYTES:
            raise SecretUnavailable(f"secrets: {path} is over {MAX_VALUE_BYTES} bytes")
        data = os.read(fd, MAX_VALUE_BYTES + 1)
    finally:
        os.close(fd)
    return data[:-1] if data.endswith(b"\n") else data
