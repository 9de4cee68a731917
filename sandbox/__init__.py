"""corral.sandbox: SandboxSpec -> validated policy -> a native (or Docker) Linux sandbox.

The names below load on first use (PEP 562): `import corral.sandbox.exit_status` or
`corral.sandbox.errors` must not pull in the native backend, its Cython spawner and the
kernel-policy modules (about 110 ms), which every `corral` command would otherwise pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Exported name -> the submodule that defines it.
_EXPORTS = {
    "DEVNULL": "backends.base", "PIPE": "backends.base", "CompletedRun": "backends.base",
    "ExitReason": "backends.base", "new_sandbox": "backends.base", "run": "backends.base",
    "Process": "backends.native", "Sandbox": "backends.native", "sweep": "backends.native",
    "CommandNotFound": "errors", "CorralError": "errors", "InvalidSpec": "errors",
    "NotFound": "errors", "PermissionDenied": "errors", "SandboxSetupError": "errors",
    "UnsupportedHost": "errors",
    "BindMount": "spec", "SandboxSpec": "spec", "SecretBinding": "spec",
    "parse_duration": "spec", "parse_size": "spec",
}

__all__ = [
    "BindMount",
    "CommandNotFound",
    "CompletedRun",
    "CorralError",
    "DEVNULL",
    "ExitReason",
    "InvalidSpec",
    "NotFound",
    "PIPE",
    "PermissionDenied",
    "Process",
    "Sandbox",
    "SandboxSetupError",
    "SandboxSpec",
    "SecretBinding",
    "UnsupportedHost",
    "new_sandbox",
    "parse_duration",
    "parse_size",
    "run",
    "sweep",
]

if TYPE_CHECKING:
    from .backends.base import DEVNULL, PIPE, CompletedRun, ExitReason, new_sandbox, run
    from .backends.native import Process, Sandbox, sweep
    from .errors import (
        CommandNotFound,
        CorralError,
        InvalidSpec,
        NotFound,
        PermissionDenied,
        SandboxSetupError,
        UnsupportedHost,
    )
    from .spec import BindMount, SandboxSpec, SecretBinding, parse_duration, parse_size


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral.sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
