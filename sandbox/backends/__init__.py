"""Sandbox backends: native (namespaces, cgroups, seccomp, landlock) and Docker, behind
one contract (base.py: the verbs, the lifecycle table, and the factory that picks one)."""

from __future__ import annotations

from .base import new_sandbox, open_sandbox, run

__all__ = ["new_sandbox", "open_sandbox", "run"]
