"""corral.sandbox: SandboxSpec -> validated policy -> a native (or Docker) Linux sandbox."""

from .backends.native import (
    DEVNULL,
    PIPE,
    CompletedRun,
    ExitReason,
    Process,
    Sandbox,
    run,
    sweep,
)
from .errors import (
    CommandNotFound,
    CorralError,
    InvalidSpec,
    NotFound,
    PermissionDenied,
    SandboxSetupError,
    UnsupportedHost,
)
from .spec import BindMount, SandboxSpec, parse_duration, parse_size

__all__ = [
    "DEVNULL",
    "PIPE",
    "BindMount",
    "CommandNotFound",
    "CompletedRun",
    "CorralError",
    "ExitReason",
    "InvalidSpec",
    "NotFound",
    "PermissionDenied",
    "Process",
    "Sandbox",
    "SandboxSetupError",
    "SandboxSpec",
    "UnsupportedHost",
    "parse_duration",
    "parse_size",
    "run",
    "sweep",
]
