"""corral: the typed Python SDK of the Corral daemon (docs/sdk.md).

    import corral

    with corral.Client() as client:                       # $CORRAL_SOCKET or the default
        with client.sandbox(memory="256M", ttl="10m") as sb:
            print(sb.run(["echo", "hi"]).stdout)          # b'hi\\n'

`corral.AsyncClient` is the same on asyncio. Results are the dataclasses of corral.types,
failures the exceptions of corral.errors. The runtime itself lives in the subpackages
(corral.runtime, corral.sandbox, corral.ext, corral.v1); this package is the one the
pyproject maps to runtime/sdk/.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Exported name -> the submodule that defines it. Loaded on first use (PEP 562): every
#: `import corral.runtime...` runs this file first, and the CLI must not pay for grpc.aio
#: and the SDK before a verb connects.
_EXPORTS = {
    "AsyncClient": "aio", "AsyncSession": "aio",
    "Client": "sync", "SandboxHandle": "sync", "Session": "sync",
    **dict.fromkeys(("AlreadyExists", "CorralError", "FailedPrecondition", "InvalidArgument",
                     "NotFound", "PermissionDenied", "ResourceExhausted", "Unavailable"),
                    "errors"),
    **dict.fromkeys(("ExecExited", "ExecOutput", "ExecResult", "ExecStarted", "FileEntry",
                     "Sandbox", "SessionExited", "SessionInfo", "SessionLagged",
                     "SessionOpened", "SessionRefused", "SessionTaskNews", "Snapshot", "Task",
                     "ArchiveResult", "FileEvent", "FileStat", "Transfer",
                     "TaskLog", "TaskResult", "Tokens", "TurnEnded", "TurnStarted"), "types"),
}

__all__ = [
    "AlreadyExists",
    "ArchiveResult",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "CorralError",
    "ExecExited",
    "ExecOutput",
    "ExecResult",
    "ExecStarted",
    "FailedPrecondition",
    "FileEntry",
    "FileEvent",
    "FileStat",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Sandbox",
    "SandboxHandle",
    "Session",
    "SessionExited",
    "SessionInfo",
    "SessionLagged",
    "SessionOpened",
    "SessionRefused",
    "SessionTaskNews",
    "Snapshot",
    "Task",
    "TaskLog",
    "TaskResult",
    "Tokens",
    "Transfer",
    "TurnEnded",
    "TurnStarted",
    "Unavailable",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .aio import AsyncClient, AsyncSession
    from .errors import (
        AlreadyExists,
        CorralError,
        FailedPrecondition,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
    )
    from .sync import Client, SandboxHandle, Session
    from .types import (
        ArchiveResult,
        ExecExited,
        ExecOutput,
        ExecResult,
        ExecStarted,
        FileEntry,
        FileEvent,
        FileStat,
        Sandbox,
        SessionExited,
        SessionInfo,
        SessionLagged,
        SessionOpened,
        SessionRefused,
        SessionTaskNews,
        Snapshot,
        Task,
        TaskLog,
        TaskResult,
        Tokens,
        Transfer,
        TurnEnded,
        TurnStarted,
    )
