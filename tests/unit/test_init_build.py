"""The corral-init a build ships: on x86-64 and arm64, PID 1 of every sandbox is built
without a C library (setup.py tries that first and falls back silently), so no libc
start-up runs at each sandbox start (ext/corral_init.c says why)."""

from __future__ import annotations

import os
import platform

import pytest

import corral.ext

INIT = os.path.join(os.path.dirname(corral.ext.__file__), "corral-init")
PT_INTERP = 3


def _program_headers(data: bytes) -> list[int]:
    """The p_type of each program header of a 64-bit little-endian ELF file."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit LE ELF"
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    return [int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little")
            for i in range(phnum)]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                    reason="built with the C library on this machine")
def test_corral_init_is_built_without_a_c_library():
    with open(INIT, "rb") as f:
        data = f.read()
    assert PT_INTERP not in _program_headers(data)  # no dynamic loader
    assert b"GLIBC" not in data and b"__libc_start_main" not in data
    assert len(data) < 64 << 10, len(data)  # a static glibc one is ~750 KB
    assert os.access(INIT, os.X_OK)
