"""Sandbox backends: native (namespaces, cgroups, seccomp, landlock) and Docker."""
