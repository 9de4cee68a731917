"""Corral test suite."""
