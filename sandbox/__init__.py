"""corral.sandbox: SandboxSpec -> validated policy -> a native (or Docker) Linux sandbox."""

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
    "new_sandbox",
    "parse_duration",
    "parse_size",
    "run",
    "sweep",
]
