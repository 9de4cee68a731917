"""Sandbox filesystem state: snapshots, forks from them, and copy-on-write workspaces.

Modules: `layers` (copying a tree a sandbox wrote into a layer, and its digest),
`snapshots` (the store), `capture` (freeze, copy, thaw, commit), `changes` (change sets of
copy-on-write workspaces), `diff` (diff and apply against the host directory). The native
backend mounts what they make (sandbox/backends/native.py); docs/state.md has the model.
"""

from __future__ import annotations

import os


def state_root(env_name: str, leaf: str) -> str:
    """$env_name, else /var/lib/corral/<leaf> for root, else the user's
    $XDG_STATE_HOME/corral/<leaf> (~/.local/state/...)."""
    configured = os.environ.get(env_name)
    if configured:
        return configured
    if os.geteuid() == 0:
        return os.path.join("/var/lib/corral", leaf)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "corral", leaf)
