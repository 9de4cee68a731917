"""Seccomp profiles shipped with Corral, in Docker's JSON profile format."""
