"""corral.ext: the compiled cores, and the choice between the token core and its Python twin.

`corral.ext.TokenStream` (and the rest of the token core's API) comes from the compiled
`corral.ext._stream` when it is built, else from the pure-Python `corral.ext._stream_py`.
The environment variable CORRAL_STREAM_IMPL forces one:

    CORRAL_STREAM_IMPL=cython   the compiled core; ImportError when it is not built
    CORRAL_STREAM_IMPL=python   the pure-Python twin (the oracle), e.g. to rule the core out
    unset or empty              compiled when importable, else Python

The choice is made on first use of one of these names, not when corral.ext is imported, so
importing `corral.ext._spawn` never loads the token core. `STREAM_IMPL` names the one chosen.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

IMPL_ENV = "CORRAL_STREAM_IMPL"

# the token core's public names, identical in both implementations (_stream_py's __all__)
STREAM_API = frozenset({
    "BATCH_OVERHEAD",
    "DEFAULT_LOG_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_TAKE_BYTES",
    "ENTRY_OVERHEAD",
    "HEADER_SIZE",
    "MAX_FIRST_SEQ",
    "MAX_FRAME_BYTES_LIMIT",
    "MAX_LOG_BYTES_LIMIT",
    "MODES",
    "Cursor",
    "CursorStatistics",
    "ErrorCode",
    "EventKind",
    "FrameType",
    "SeqEvictedError",
    "StreamClosedError",
    "StreamEvent",
    "StreamStatistics",
    "TokenStream",
    "encode_frame",
})

__all__ = sorted(STREAM_API | {"IMPL_ENV", "STREAM_API", "STREAM_IMPL", "load_stream_impl"})

_chosen: ModuleType | None = None


def load_stream_impl(choice: str | None = None) -> ModuleType:
    """The token core module for `choice` ("cython", "python", or "" for the best available).

    Args:
        choice: None reads CORRAL_STREAM_IMPL.

    Raises:
        ImportError: "cython" was asked for and the extension is not built, or the choice is
            not one of the three.
    """
    if choice is None:
        choice = os.environ.get(IMPL_ENV, "")
    choice = choice.strip().lower()
    if choice == "python":
        return importlib.import_module("corral.ext._stream_py")
    if choice == "cython":
        try:
            return importlib.import_module("corral.ext._stream")
        except ImportError as exc:
            raise ImportError(
                f"{IMPL_ENV}=cython but the compiled token core corral.ext._stream cannot be "
                f"imported ({exc}); build it with `make ext`, or unset {IMPL_ENV} to fall "
                f"back to the Python twin") from exc
    if choice == "":
        try:
            return importlib.import_module("corral.ext._stream")
        except ImportError:
            return importlib.import_module("corral.ext._stream_py")
    raise ImportError(f"{IMPL_ENV} must be 'cython', 'python' or empty, not {choice!r}")


def __getattr__(name: str):
    global _chosen
    if name in STREAM_API or name == "STREAM_IMPL":
        if _chosen is None:
            _chosen = load_stream_impl()
        if name == "STREAM_IMPL":
            return _chosen.IMPLEMENTATION
        return getattr(_chosen, name)
    raise AttributeError(f"module 'corral.ext' has no attribute {name!r}")
