"""Seccomp: owns Docker-format JSON profiles, their validation, and their compilation to BPF.

The parent process does all the work here: `load_profile` (or `parse_profile`) turns a profile
into a frozen `SeccompProfile`, and `prepare` compiles it with libseccomp (through ctypes, no
headers needed) into the raw classic-BPF program for the native architecture. The sandbox child
only hands those bytes to `seccomp(SECCOMP_SET_MODE_FILTER, profile.load_flags, &sock_fprog)`
after setting no_new_privs, as the last step before execve.

Semantics, kept close to Docker/runc so that a security team's profile means the same here:

- A rule's `args` with distinct indexes are ANDed into one libseccomp rule; when an index occurs
  more than once, every condition becomes a rule of its own (ORed) -- runc's behaviour, and the
  only way to say "arg0 is one of ..." since libseccomp 2.5 refuses two tests on one argument.
- `SCMP_CMP_MASKED_EQ` takes the mask in `value` and the expected value in `valueTwo`.
- Names that libseccomp does not know, or that are no syscall on the native architecture, are
  skipped like Docker skips them, and listed in `SeccompProfile.skipped` for audit.
- `includes`/`excludes`: sandboxes hold no capabilities, so a rule that includes `caps` never
  applies and excluded caps never prevent one; `arches` match the native architecture (Go names
  such as "amd64" and SCMP_ARCH_* names); `minKernel` is compared with the running kernel.
- A rule whose action equals the default action is redundant; libseccomp refuses it, so it is
  not compiled (it still documents intent and is checked for conflicts).
- libseccomp lets an unconditional rule silently win over every conditional rule of the same
  syscall; a profile relying on the conditional one would be weaker than it reads, so it is
  rejected at load time.

Corral's own policy, independent of the profile:

- Only the native architecture is compiled in; every other one (i386 via int 0x80, x32 syscall
  numbers with bit 30 set) hits the bad-arch action, SCMP_ACT_KILL_PROCESS (dies by SIGSYS).
  `architectures`/`archMap` are validated and recorded but add no sub-architecture.
- When the default action denies, syscall numbers above the highest one the profile names get
  ENOSYS instead (runc does the same): software probing a syscall newer than the profile, and
  newer than this host's libseccomp, sees "not implemented" and falls back, as glibc needs.
- SCMP_ACT_NOTIFY is refused: Corral runs no seccomp listener.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import hashlib
import json
import os
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .errors import InvalidSpec, SandboxSetupError, UnsupportedHost

__all__ = [
    "ArgCondition",
    "RuleScope",
    "SeccompProfile",
    "SyscallRule",
    "describe",
    "builtin_profile_names",
    "load_profile",
    "parse_profile",
    "prepare",
    "requested_profile",
]

# -- the vocabulary of the profile format ------------------------------------------------------

#: Action names -> the SECCOMP_RET_* value libseccomp uses (low 16 bits carry errno / trace data).
ACTIONS: dict[str, int] = {
    "SCMP_ACT_KILL": 0x00000000,  # kills the thread, as in Docker
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_DATA_ACTIONS = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")  # the ones whose errnoRet means something
_PERMISSIVE_ACTIONS = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")

#: Comparison names -> enum scmp_compare of libseccomp.
COMPARISONS: dict[str, int] = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

#: seccomp(2) filter flags a profile may ask for -> the value the child passes to seccomp().
FILTER_FLAGS: dict[str, int] = {
    # Has no effect here: the sandbox child is single-threaded when it loads the filter.
    "SECCOMP_FILTER_FLAG_TSYNC": 0,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}

ARCHITECTURES = frozenset(
    "SCMP_ARCH_" + a
    for a in (
        "NATIVE X86 X86_64 X32 ARM AARCH64 LOONGARCH64 M68K MIPS MIPS64 MIPS64N32 MIPSEL "
        "MIPSEL64 MIPSEL64N32 PPC PPC64 PPC64LE S390 S390X PARISC PARISC64 RISCV64 SH SHEB"
    ).split()
)

#: How the native machine is spelled in `includes.arches` (Go names, as Docker writes them).
_MACHINE_ARCHES: dict[str, tuple[str, ...]] = {
    "x86_64": ("amd64", "x86_64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "aarch64", "SCMP_ARCH_AARCH64"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
    "loongarch64": ("loong64", "loongarch64", "SCMP_ARCH_LOONGARCH64"),
}

_TOP_KEYS = frozenset(
    "defaultAction defaultErrnoRet architectures archMap syscalls flags listenerPath "
    "listenerMetadata".split()
)
_RULE_KEYS = frozenset("names name action errnoRet args comment includes excludes".split())
_ARG_KEYS = frozenset(("index", "value", "valueTwo", "op"))
_SCOPE_KEYS = frozenset(("caps", "arches", "minKernel"))
_ARCHMAP_KEYS = frozenset(("architecture", "subArchitectures"))

_SYSCALL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_CAP_NAME = re.compile(r"^CAP_[A-Z_]+$")
_KERNEL_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")

_MAX_PROFILE_BYTES = 4 << 20  # a real profile is a few KiB; refuse to parse a runaway file
_MAX_ERRNO = 4095  # the kernel caps SECCOMP_RET_ERRNO data at MAX_ERRNO
_U64 = (1 << 64) - 1
_BPF_MAXINSNS = 4096


# -- the parsed profile ------------------------------------------------------------------------


@dataclass(frozen=True)
class ArgCondition:
    """One comparison of a syscall argument (`args[]` entry of the profile)."""

    index: int  # argument number, 0..5
    op: str  # one of COMPARISONS
    value: int  # unsigned 64-bit; the mask for SCMP_CMP_MASKED_EQ
    value_two: int = 0  # unsigned 64-bit; the expected value for SCMP_CMP_MASKED_EQ

    def __str__(self) -> str:
        arg = f"arg{self.index}"
        if self.op == "SCMP_CMP_MASKED_EQ":
            return f"{arg} & {self.value:#x} == {self.value_two:#x}"
        symbol = {"NE": "!=", "LT": "<", "LE": "<=", "EQ": "==", "GE": ">=", "GT": ">"}
        return f"{arg} {symbol[self.op.removeprefix('SCMP_CMP_')]} {self.value:#x}"


@dataclass(frozen=True)
class RuleScope:
    """The `includes` or `excludes` of a rule; empty fields do not constrain."""

    caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    min_kernel: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SyscallRule:
    """One `syscalls[]` entry, with whether (and why not) it applies on this host."""

    names: tuple[str, ...]
    action: str
    errno_ret: int | None  # None: EPERM for SCMP_ACT_ERRNO, 0 for SCMP_ACT_TRACE
    args: tuple[ArgCondition, ...] = ()
    includes: RuleScope = RuleScope()
    excludes: RuleScope = RuleScope()
    comment: str = ""
    inactive_reason: str = ""  # empty when the rule applies on this host

    @property
    def active(self) -> bool:
        return not self.inactive_reason

    @property
    def action_value(self) -> int:
        return _action_value(self.action, self.errno_ret)


@dataclass(frozen=True)
class SeccompProfile:
    """A validated seccomp profile; `unconfined` means no filter at all."""

    name: str  # what the caller asked for: "default", "unconfined" or the path
    source: str  # "builtin" or the absolute path of the file
    digest: str  # sha256 hex of the canonical JSON of the profile, for audit and caching
    unconfined: bool = False
    default_action: str = "SCMP_ACT_ALLOW"
    default_errno_ret: int | None = None
    architectures: tuple[str, ...] = ()  # recorded only: Corral compiles for the native arch
    rules: tuple[SyscallRule, ...] = ()
    flags: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # names of active rules unknown here (libseccomp/arch)

    @property
    def default_action_value(self) -> int:
        return _action_value(self.default_action, self.default_errno_ret)

    @property
    def load_flags(self) -> int:
        """The `flags` argument the child passes to seccomp(SECCOMP_SET_MODE_FILTER, ...)."""
        value = 0
        for flag in self.flags:
            value |= FILTER_FLAGS[flag]
        return value


_PROFILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")


def _action_value(action: str, errno_ret: int | None) -> int:
    value = ACTIONS[action]
    if action == "SCMP_ACT_ERRNO":
        value |= _errno.EPERM if errno_ret is None else errno_ret
    elif action == "SCMP_ACT_TRACE":
        value |= errno_ret or 0
    return value


def _action_text(action: str, errno_ret: int | None) -> str:
    if action == "SCMP_ACT_ERRNO":
        code = _errno.EPERM if errno_ret is None else errno_ret
        return f"{action}({_errno.errorcode.get(code, code)})"
    if action == "SCMP_ACT_TRACE":
        return f"{action}({errno_ret or 0})"
    return action


# -- loading and validation --------------------------------------------------------------------

_UNCONFINED_DIGEST = hashlib.sha256(b'"unconfined"').hexdigest()


@functools.cache
def builtin_profile_names() -> tuple[str, ...]:
    """"unconfined" and the NAME of every NAME.json shipped in sandbox/profiles/."""
    names = {"unconfined"}
    for entry in os.listdir(_PROFILES_DIR):
        stem, ext = os.path.splitext(entry)
        if ext == ".json" and stem:
            names.add(stem)
    return tuple(sorted(names))


def requested_profile(name: str, field_name: str = "profile") -> str:
    """The profile an API caller names, as the daemon will load it.

    Only a built-in name (`builtin_profile_names`) or a normalized absolute path: a bare
    name is never looked up as a file (the daemon's working directory is nobody's to
    choose), and whether the caller may use a given file is the tenant policy's decision
    (runtime/policy.py, `profiles`). The local CLI loads a file the user names through
    `load_profile` instead.

    Raises:
        InvalidSpec: anything else (field `field_name`).
    """
    if name in builtin_profile_names():
        return name
    if os.path.isabs(name):
        if "\0" in name or os.path.normpath(name) != name:
            raise InvalidSpec(field_name, f"{name!r} is not a normalized absolute path (no "
                                          "'..', '.', '//' or trailing '/')")
        return name
    raise InvalidSpec(field_name, f"no built-in profile named {name!r}; name one of "
                                  f"{', '.join(builtin_profile_names())}, or the absolute "
                                  "path of a profile file the operator allows")


def load_profile(name_or_path: str) -> SeccompProfile:
    """Load a builtin profile by name (`builtin_profile_names`) or a Docker JSON file by path.

    A file that happens to be called like a built-in is reached as "./default". A relative
    path is resolved in the working directory: for the local CLI only (API callers' names
    go through `requested_profile` first).

    Raises:
        InvalidSpec: the file is missing, unreadable or not a valid profile (field "profile").
        UnsupportedHost: libseccomp.so.2 is not installed.
    """
    if name_or_path == "unconfined":
        return SeccompProfile(
            name="unconfined", source="builtin", digest=_UNCONFINED_DIGEST, unconfined=True
        )
    if name_or_path in builtin_profile_names():
        return _builtin_profile(name_or_path)
    path = os.path.abspath(name_or_path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        if os.sep in name_or_path or name_or_path.endswith(".json"):
            raise InvalidSpec(
                "profile",
                f"file {name_or_path!r} does not exist; "
                "pass the path of a Docker seccomp JSON profile",
            ) from None
        raise InvalidSpec(
            "profile",
            f"no profile named {name_or_path!r}; use 'default', 'unconfined' "
            "or the path of a Docker seccomp JSON profile",
        ) from None
    except OSError as e:
        raise InvalidSpec("profile", f"cannot read {name_or_path!r}: {e.strerror}") from None
    if len(data) > _MAX_PROFILE_BYTES:
        raise InvalidSpec(
            "profile", f"{name_or_path!r} is larger than 4 MiB; a seccomp profile is a few KiB"
        )
    return parse_profile(data, name=name_or_path, source=path)


@functools.cache
def _builtin_profile(name: str) -> SeccompProfile:
    # A plain open() next to this module: importlib.resources costs ~8 ms of CLI start-up.
    with open(os.path.join(_PROFILES_DIR, f"{name}.json"), "rb") as f:
        data = f.read()
    return parse_profile(data, name=name, source="builtin")


def parse_profile(data: bytes | str, *, name: str, source: str) -> SeccompProfile:
    """Validate a profile given as JSON text (e.g. received over the API).

    Args:
        data: the JSON document, in Docker's seccomp profile format.
        name: what the user called it, for messages ("default", a path, "request").
        source: "builtin" or where it came from, recorded for audit.

    Raises:
        InvalidSpec: the document is not a valid profile (field "profile").
    """
    # Spawning is a hot path and a profile is immutable: the same text parses to the same
    # object. The key holds a hash, not the text, so the cache stays small whatever it is fed.
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    key = (hashlib.sha256(raw).digest(), name, source)
    with _PARSED_LOCK:
        profile = _parsed.get(key)
        if profile is not None:
            _parsed.move_to_end(key)
            return profile
    profile = _parse(data, name, source)
    with _PARSED_LOCK:
        _parsed[key] = profile
        if len(_parsed) > _CACHE_SIZE:
            _parsed.popitem(last=False)
    return profile


_CACHE_SIZE = 64
_parsed: OrderedDict[tuple[bytes, str, str], SeccompProfile] = OrderedDict()
_PARSED_LOCK = threading.Lock()


def _parse(data: bytes | str, name: str, source: str) -> SeccompProfile:
    where = _where(name, source)
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidSpec(
                "profile", f"{where} is not UTF-8 text (bad byte at offset {e.start})"
            ) from None
    else:
        text = data
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InvalidSpec(
            "profile", f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except _NotAProfile as e:
        raise InvalidSpec(
            "profile", f"{where} is not valid JSON for a profile: {e.args[0]}"
        ) from None
    return _Validator(where).profile(doc, name=name, source=source)


def _where(name: str, source: str) -> str:
    """How messages name a profile: the path the user gave, or the builtin's name."""
    return f"builtin profile {name!r}" if source == "builtin" else repr(name)


class _NotAProfile(ValueError):
    """Valid JSON that no profile may contain: duplicate keys, NaN, Infinity."""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _NotAProfile(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constant(token: str) -> object:
    raise _NotAProfile(f"{token} is not a number a profile can use")


def _canonical_json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _Validator:
    """Walks a decoded profile; every error names the JSON path of the offending field."""

    def __init__(self, where: str):
        self.where = where
        self.host_arches = _MACHINE_ARCHES.get(os.uname().machine, (os.uname().machine,))
        self.kernel = _kernel_version()

    def fail(self, path: str, problem: str) -> InvalidSpec:
        return InvalidSpec("profile", f"{self.where}: {path} {problem}")

    # -- typed getters

    def obj(self, value: object, path: str, keys: frozenset[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a JSON object, not {_json_type(value)}")
        unknown = sorted(set(value) - keys)
        if unknown:
            raise self.fail(
                path,
                f"has an unknown field {unknown[0]!r}; known fields: {', '.join(sorted(keys))}",
            )
        return value

    def array(self, value: object, path: str) -> list:
        if not isinstance(value, list):
            raise self.fail(path, f"must be a JSON array, not {_json_type(value)}")
        return value

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, not {_json_type(value)}")
        return value

    def strings(self, value: object, path: str) -> tuple[str, ...]:
        return tuple(self.string(v, f"{path}[{i}]") for i, v in enumerate(self.array(value, path)))

    def uint(self, value: object, path: str, maximum: int, hint: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            shown = json.dumps(value) if not isinstance(value, dict | list) else _json_type(value)
            raise self.fail(path, f"{shown} is not {hint}")
        return value

    # -- the document

    def profile(self, doc: object, *, name: str, source: str) -> SeccompProfile:
        top = self.obj(doc, "the document", _TOP_KEYS)
        if "defaultAction" not in top:
            raise self.fail("defaultAction", 'is missing; e.g. "defaultAction": "SCMP_ACT_ERRNO"')
        default_action = self.action(top["defaultAction"], "defaultAction")
        default_errno = self.errno_ret(
            top.get("defaultErrnoRet"), "defaultErrnoRet", default_action
        )
        if top.get("listenerPath") or top.get("listenerMetadata"):
            raise self.fail(
                "listenerPath", "is set, but Corral runs no seccomp listener; remove it"
            )
        architectures = self.architectures(top)
        flags = self.strings(_given(top, "flags", []), "flags")
        for i, flag in enumerate(flags):
            if flag not in FILTER_FLAGS:
                raise self.fail(
                    f"flags[{i}]",
                    f"{flag!r} is not supported; use {', '.join(sorted(FILTER_FLAGS))}",
                )
        rules = tuple(
            self.rule(entry, f"syscalls[{i}]")
            for i, entry in enumerate(self.array(_given(top, "syscalls", []), "syscalls"))
        )
        self.check_conflicts(rules)
        return SeccompProfile(
            name=name,
            source=source,
            digest=hashlib.sha256(_canonical_json(doc)).hexdigest(),
            default_action=default_action,
            default_errno_ret=default_errno,
            architectures=architectures,
            rules=rules,
            flags=flags,
            skipped=_unresolvable(rules),
        )

    def action(self, value: object, path: str) -> str:
        action = self.string(value, path)
        if action == "SCMP_ACT_NOTIFY":
            raise self.fail(
                path,
                "SCMP_ACT_NOTIFY needs a seccomp listener, which Corral does not run; "
                "use SCMP_ACT_ERRNO or SCMP_ACT_LOG",
            )
        if action not in ACTIONS:
            raise self.fail(
                path, f"{action!r} is not a seccomp action; use one of {', '.join(ACTIONS)}"
            )
        return action

    def errno_ret(self, value: object, path: str, action: str) -> int | None:
        if value is None:
            return None
        if action not in _DATA_ACTIONS:
            raise self.fail(
                path, f"is only meaningful with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, not {action}"
            )
        return self.uint(value, path, _MAX_ERRNO, "an errno number (0..4095)")

    def architectures(self, top: dict) -> tuple[str, ...]:
        named = [
            (f"architectures[{i}]", arch)
            for i, arch in enumerate(
                self.strings(_given(top, "architectures", []), "architectures")
            )
        ]
        for i, entry in enumerate(self.array(_given(top, "archMap", []), "archMap")):
            entry = self.obj(entry, f"archMap[{i}]", _ARCHMAP_KEYS)
            if "architecture" not in entry:
                raise self.fail(f"archMap[{i}].architecture", "is missing")
            path = f"archMap[{i}].architecture"
            named.append((path, self.string(entry["architecture"], path)))
            path = f"archMap[{i}].subArchitectures"
            subs = self.strings(_given(entry, "subArchitectures", []), path)
            named.extend((f"{path}[{j}]", arch) for j, arch in enumerate(subs))
        for path, arch in named:
            if arch not in ARCHITECTURES:
                raise self.fail(
                    path, f"{arch!r} is not a seccomp architecture; use e.g. SCMP_ARCH_X86_64"
                )
        return tuple(dict.fromkeys(arch for _, arch in named))

    def rule(self, value: object, path: str) -> SyscallRule:
        entry = self.obj(value, path, _RULE_KEYS)
        if "names" in entry and "name" in entry:
            raise self.fail(path, 'has both "name" and "names"; keep "names"')
        if "names" in entry:
            names = self.strings(entry["names"], f"{path}.names")
            if not names:
                raise self.fail(f"{path}.names", "is empty; list at least one syscall name")
            name_paths = [f"{path}.names[{i}]" for i in range(len(names))]
        elif "name" in entry:
            names = (self.string(entry["name"], f"{path}.name"),)
            name_paths = [f"{path}.name"]
        else:
            raise self.fail(path, 'has no "names"; list the syscalls the rule is for')
        for name_path, syscall in zip(name_paths, names, strict=True):
            if not _SYSCALL_NAME.match(syscall):
                raise self.fail(
                    name_path,
                    f"{syscall!r} is not a syscall name (lowercase letters, digits and _)",
                )
        if "action" not in entry:
            raise self.fail(f"{path}.action", 'is missing; e.g. "action": "SCMP_ACT_ALLOW"')
        action = self.action(entry["action"], f"{path}.action")
        errno_ret = self.errno_ret(entry.get("errnoRet"), f"{path}.errnoRet", action)
        args = tuple(
            self.arg(arg, f"{path}.args[{i}]")
            for i, arg in enumerate(self.array(_given(entry, "args", []), f"{path}.args"))
        )
        includes = self.scope(_given(entry, "includes", {}), f"{path}.includes")
        excludes = self.scope(_given(entry, "excludes", {}), f"{path}.excludes")
        comment = self.string(_given(entry, "comment", ""), f"{path}.comment")
        return SyscallRule(
            names=names,
            action=action,
            errno_ret=errno_ret,
            args=args,
            includes=includes,
            excludes=excludes,
            comment=comment,
            inactive_reason=self.inactive_reason(includes, excludes),
        )

    def arg(self, value: object, path: str) -> ArgCondition:
        arg = self.obj(value, path, _ARG_KEYS)
        for key in ("index", "op"):
            if key not in arg:
                raise self.fail(f"{path}.{key}", "is missing")
        index = self.uint(arg["index"], f"{path}.index", 5, "an argument index (0..5)")
        op = self.string(arg["op"], f"{path}.op")
        if op not in COMPARISONS:
            raise self.fail(
                f"{path}.op",
                f"{op!r} is not a comparison; use one of {', '.join(COMPARISONS)}",
            )
        hint = "an unsigned 64-bit integer"
        value = self.uint(arg.get("value", 0), f"{path}.value", _U64, hint)
        value_two = self.uint(arg.get("valueTwo", 0), f"{path}.valueTwo", _U64, hint)
        return ArgCondition(index=index, op=op, value=value, value_two=value_two)

    def scope(self, value: object, path: str) -> RuleScope:
        scope = self.obj(value, path, _SCOPE_KEYS)
        caps = self.strings(_given(scope, "caps", []), f"{path}.caps")
        for i, cap in enumerate(caps):
            if not _CAP_NAME.match(cap):
                raise self.fail(f"{path}.caps[{i}]", f"{cap!r} is not a capability name")
        arches = self.strings(_given(scope, "arches", []), f"{path}.arches")
        min_kernel = None
        if scope.get("minKernel"):
            text = self.string(scope["minKernel"], f"{path}.minKernel")
            match = _KERNEL_VERSION.match(text)
            if not match:
                raise self.fail(
                    f"{path}.minKernel", f'{text!r} is not a kernel version; use e.g. "5.8"'
                )
            min_kernel = tuple(int(part) for part in match.groups() if part is not None)
        return RuleScope(caps=caps, arches=arches, min_kernel=min_kernel)

    def inactive_reason(self, includes: RuleScope, excludes: RuleScope) -> str:
        if includes.caps:
            return f"needs {', '.join(includes.caps)}; sandboxes hold no capabilities"
        if includes.arches and not set(includes.arches) & set(self.host_arches):
            return f"only for arches {', '.join(includes.arches)}"
        if set(excludes.arches) & set(self.host_arches):
            return f"excluded on {self.host_arches[0]}"
        if includes.min_kernel and self.kernel < includes.min_kernel:
            return f"needs kernel >= {'.'.join(map(str, includes.min_kernel))}"
        if excludes.min_kernel and self.kernel >= excludes.min_kernel:
            return f"excluded on kernel >= {'.'.join(map(str, excludes.min_kernel))}"
        return ""

    def check_conflicts(self, rules: tuple[SyscallRule, ...]) -> None:
        # libseccomp keeps one unconditional rule per syscall and drops every conditional rule
        # of that syscall, in whatever order they are added: refuse what would not hold.
        unconditional: dict[str, int] = {}
        for i, rule in enumerate(rules):
            if rule.active and not rule.args:
                for syscall in rule.names:
                    first = unconditional.setdefault(syscall, i)
                    if rules[first].action_value != rule.action_value:
                        raise self.fail(
                            f"syscalls[{i}]",
                            f"gives {syscall!r} {_action_text(rule.action, rule.errno_ret)} "
                            f"but syscalls[{first}] gives it "
                            f"{_action_text(rules[first].action, rules[first].errno_ret)}; "
                            "keep one unconditional rule per syscall",
                        )
        for i, rule in enumerate(rules):
            if not rule.active or not rule.args:
                continue
            for syscall in rule.names:
                first = unconditional.get(syscall)
                if first is not None and rules[first].action_value != rule.action_value:
                    raise self.fail(
                        f"syscalls[{i}]",
                        f"can never apply: syscalls[{first}] gives {syscall!r} "
                        f"{_action_text(rules[first].action, rules[first].errno_ret)} "
                        "for every call, which libseccomp lets win over conditional rules; "
                        "make that rule conditional too",
                    )


def _given(obj: dict, key: str, default: object) -> object:
    """obj[key], with JSON null or absence meaning `default` (as Go's decoder treats them)."""
    value = obj.get(key)
    return default if value is None else value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _kernel_version() -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", os.uname().release)
    if not match:
        return (0, 0)
    return tuple(int(part) for part in match.groups() if part is not None)


# -- libseccomp through ctypes -----------------------------------------------------------------


class _ScmpArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp of <seccomp.h>."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


# enum scmp_filter_attr (stable numbering since libseccomp 2.4)
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_OPTIMIZE = 8

_LIB_LOCK = threading.Lock()
_lib: ctypes.CDLL | None = None


def _libseccomp() -> ctypes.CDLL:
    global _lib
    with _LIB_LOCK:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
            except OSError:
                raise UnsupportedHost(
                    "seccomp profiles need libseccomp.so.2 (Debian/Ubuntu package libseccomp2); "
                    "install it or run with --profile unconfined"
                ) from None
            lib.seccomp_init.argtypes = [ctypes.c_uint32]
            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_release.argtypes = [ctypes.c_void_p]
            lib.seccomp_release.restype = None
            lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
            lib.seccomp_attr_set.restype = ctypes.c_int
            lib.seccomp_arch_native.argtypes = []
            lib.seccomp_arch_native.restype = ctypes.c_uint32
            lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
            lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
            lib.seccomp_rule_add_array.argtypes = [
                ctypes.c_void_p,
                ctypes.c_uint32,
                ctypes.c_int,
                ctypes.c_uint,
                ctypes.POINTER(_ScmpArgCmp),
            ]
            lib.seccomp_rule_add_array.restype = ctypes.c_int
            lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.seccomp_export_bpf.restype = ctypes.c_int
            _lib = lib
        return _lib


def _resolve(name: str) -> int:
    """The native syscall number of `name`, or a negative number when there is none here."""
    lib = _libseccomp()
    return lib.seccomp_syscall_resolve_name_arch(lib.seccomp_arch_native(), name.encode())


def _unresolvable(rules: tuple[SyscallRule, ...]) -> tuple[str, ...]:
    names = {n for rule in rules if rule.active for n in rule.names}
    return tuple(sorted(n for n in names if _resolve(n) < 0))


def _condition_sets(args: tuple[ArgCondition, ...]) -> list[tuple[ArgCondition, ...]]:
    """How runc turns a rule's args into libseccomp rules: one ANDed rule, or one per arg."""
    indexes = [a.index for a in args]
    if len(set(indexes)) == len(indexes):
        return [args]
    return [(a,) for a in args]


# -- compilation -------------------------------------------------------------------------------

_programs: OrderedDict[str, bytes] = OrderedDict()  # by profile digest
_PROGRAMS_LOCK = threading.Lock()


def prepare(profile: SeccompProfile) -> bytes | None:
    """Compile `profile` into the classic-BPF program for the native arch (None: unconfined).

    The result is an array of `struct sock_filter` (8 bytes each) ready for a `sock_fprog`.
    Programs are cached by profile digest, so preparing the same profile again is a lookup.

    Raises:
        InvalidSpec: libseccomp refuses a rule, or the program exceeds the kernel's 4096
            instructions.
        UnsupportedHost: libseccomp.so.2 is not installed.
    """
    if profile.unconfined:
        return None
    with _PROGRAMS_LOCK:
        program = _programs.get(profile.digest)
        if program is None:
            program = _compile(profile)
            _programs[profile.digest] = program
            if len(_programs) > _CACHE_SIZE:
                _programs.popitem(last=False)
        else:
            _programs.move_to_end(profile.digest)
        return program


def _compile(profile: SeccompProfile) -> bytes:
    where = _where(profile.name, profile.source)
    lib = _libseccomp()
    default = profile.default_action_value
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SandboxSetupError("seccomp_init", None, _errno.EINVAL, "libseccomp refused it")
    try:
        _set_attr(lib, ctx, _ATTR_ACT_BADARCH, ACTIONS["SCMP_ACT_KILL_PROCESS"])
        _set_attr(lib, ctx, _ATTR_CTL_NNP, 0)  # the child sets no_new_privs itself
        _set_attr(lib, ctx, _ATTR_CTL_TSYNC, 0)
        # A binary search over syscall numbers instead of a linear scan: measured here on an
        # allowlist of ~330 syscalls, it takes the filter's cost per syscall from 30-170 ns to
        # noise. libseccomp < 2.5 lacks the attribute; its linear layout is only slower, so the
        # result is not checked.
        lib.seccomp_attr_set(ctx, _ATTR_CTL_OPTIMIZE, 2)
        highest = -1
        for i, rule in enumerate(profile.rules):
            if not rule.active:
                continue
            numbers = [(n, _resolve(n)) for n in rule.names]
            highest = max([highest] + [nr for _, nr in numbers])
            if rule.action_value == default:
                continue
            for syscall, nr in numbers:
                if nr < 0:
                    continue
                for conditions in _condition_sets(rule.args):
                    array = (_ScmpArgCmp * max(1, len(conditions)))(
                        *(
                            _ScmpArgCmp(c.index, COMPARISONS[c.op], c.value, c.value_two)
                            for c in conditions
                        )
                    )
                    rc = lib.seccomp_rule_add_array(
                        ctx, rule.action_value, nr, len(conditions), array
                    )
                    if rc < 0:
                        raise InvalidSpec(
                            "profile",
                            f"{where}: syscalls[{i}] for {syscall!r} was refused by libseccomp: "
                            f"{os.strerror(-rc)}",
                        )
        program = _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)
    if profile.default_action not in _PERMISSIVE_ACTIONS and highest >= 0:
        program = _enosys_above(lib.seccomp_arch_native(), highest) + program
    if len(program) // 8 > _BPF_MAXINSNS:
        raise InvalidSpec(
            "profile",
            f"{where} compiles to {len(program) // 8} BPF instructions, over the kernel's "
            f"limit of {_BPF_MAXINSNS}; merge rules or drop argument conditions",
        )
    return program


def _set_attr(lib: ctypes.CDLL, ctx: int, attr: int, value: int) -> None:
    rc = lib.seccomp_attr_set(ctx, attr, value)
    if rc < 0:
        raise SandboxSetupError("seccomp_attr_set", None, -rc, f"attribute {attr}")


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    fd = os.memfd_create("corral-seccomp-bpf", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise SandboxSetupError("seccomp_export_bpf", None, -rc)
        size = os.fstat(fd).st_size
        program = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if len(program) != size or size % 8:
        raise SandboxSetupError("seccomp_export_bpf", None, _errno.EIO, f"{size} bytes")
    return program


# classic BPF opcodes and struct seccomp_data offsets
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGT_K = 0x25
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06
_SECCOMP_DATA_NR = 0
_SECCOMP_DATA_ARCH = 4
_SECCOMP_RET_ERRNO = 0x00050000
_X32_SYSCALL_BIT = 0x40000000


def _enosys_above(audit_arch: int, highest: int) -> bytes:
    """A prologue: native syscall numbers above `highest` fail with ENOSYS.

    Anything else falls through to libseccomp's program, untouched: other arches (which it
    kills), numbers with bit 30 set (x32 on x86_64, which it kills, and -1), and every known nr.
    Classic BPF only jumps forward and relatively, so a prologue leaves the program valid.
    """
    insns = [
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARCH),
        (_BPF_JEQ_K, 0, 4, audit_arch),  # other arch -> program
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_NR),
        (_BPF_JGE_K, 2, 0, _X32_SYSCALL_BIT),  # x32 or -1 -> program
        (_BPF_JGT_K, 0, 1, highest),  # known -> program
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _errno.ENOSYS),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


# -- for people ----------------------------------------------------------------------------------


def describe(profile: SeccompProfile) -> dict:
    """Summarize what `profile` allows and denies on this host, as plain JSON-able data."""
    if profile.unconfined:
        return {
            "name": profile.name,
            "source": profile.source,
            "digest": profile.digest,
            "unconfined": True,
        }
    allowed: set[str] = set()
    denied: dict[str, str] = {}
    conditional: dict[str, list[dict[str, object]]] = {}
    inactive = []
    for i, rule in enumerate(profile.rules):
        if not rule.active:
            inactive.append({"rule": i, "names": list(rule.names), "why": rule.inactive_reason})
            continue
        action = _action_text(rule.action, rule.errno_ret)
        for syscall in rule.names:
            if syscall in profile.skipped:
                continue
            if rule.args:
                conditional.setdefault(syscall, []).append(
                    {
                        "action": action,
                        "when": [str(c) for c in rule.args],
                        # how the conditions combine (runc's rule, see the module docstring)
                        "combine": "all" if len(_condition_sets(rule.args)) == 1 else "any",
                    }
                )
            elif rule.action in _PERMISSIVE_ACTIONS:
                allowed.add(syscall)
            else:
                denied[syscall] = action
    return {
        "name": profile.name,
        "source": profile.source,
        "digest": profile.digest,
        "unconfined": False,
        "default": _action_text(profile.default_action, profile.default_errno_ret),
        "other_architectures": "SCMP_ACT_KILL_PROCESS",
        # numbers above the newest syscall the profile names (see the module docstring)
        "newer_syscalls": _action_text(profile.default_action, profile.default_errno_ret)
        if profile.default_action in _PERMISSIVE_ACTIONS
        else "SCMP_ACT_ERRNO(ENOSYS)",
        "allowed": sorted(allowed),
        "denied": dict(sorted(denied.items())),
        "conditional": dict(sorted(conditional.items())),
        "inactive_rules": inactive,
        "skipped": list(profile.skipped),
    }
