"""Where a daemon listens and keeps its state unless told otherwise.

The daemon's config and the client both need the default socket; this module imports only
the standard library, so `import corral.runtime.client` pulls in no sandbox module.
"""

from __future__ import annotations

import os


def default_socket() -> str:
    """$XDG_RUNTIME_DIR/corral.sock for users, /run/corral/corral.sock for root."""
    if os.geteuid() != 0 and os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "corral.sock")
    return "/run/corral/corral.sock"


def default_state() -> str:
    """/var/lib/corral for root, $XDG_STATE_HOME/corral (~/.local/state/corral) for users."""
    if os.geteuid() == 0:
        return "/var/lib/corral"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "corral")
