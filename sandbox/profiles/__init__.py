"""Builtin seccomp profiles in Docker's JSON format, shipped as package data (see README.md)."""
