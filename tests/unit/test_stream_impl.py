"""corral.ext picks the compiled token core or its Python twin (CORRAL_STREAM_IMPL)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import corral.ext
from corral.ext import load_stream_impl

try:
    importlib.import_module("corral.ext._stream")
    BUILT = True
except ImportError:
    BUILT = False


def _python(code: str, impl: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_STREAM_IMPL"}
    if impl is not None:
        env["CORRAL_STREAM_IMPL"] = impl
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_python_is_always_available():
    assert load_stream_impl("python") is importlib.import_module("corral.ext._stream_py")
    assert load_stream_impl(" Python ").IMPLEMENTATION == "python"


@pytest.mark.skipif(not BUILT, reason="corral.ext._stream is not built (run `make ext`)")
def test_compiled_is_preferred_when_built():
    assert load_stream_impl("").IMPLEMENTATION == "cython"
    assert load_stream_impl("cython").IMPLEMENTATION == "cython"


def test_forcing_cython_when_it_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "corral.ext._stream", None)  # as if never built
    with pytest.raises(ImportError,
                       match=r"^CORRAL_STREAM_IMPL=cython but the compiled token core "
                             r"corral\.ext\._stream cannot be imported \(.+\); build it with "
                             r"`make ext`, or unset CORRAL_STREAM_IMPL to fall back to the "
                             r"Python twin$"):
        load_stream_impl("cython")
    assert load_stream_impl("").IMPLEMENTATION == "python"


def test_unknown_choice():
    with pytest.raises(ImportError, match=r"^CORRAL_STREAM_IMPL must be 'cython', 'python' "
                                          r"or empty, not 'rust'$"):
        load_stream_impl("rust")


@pytest.mark.parametrize("impl,expected", [
    ("python", "python corral.ext._stream_py"),
    pytest.param("cython", "cython corral.ext._stream",
                 marks=pytest.mark.skipif(not BUILT, reason="extension not built")),
])
def test_environment_variable_forces_the_choice(impl, expected):
    proc = _python("import corral.ext as e; print(e.STREAM_IMPL, e.TokenStream.__module__)",
                   impl)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_the_choice_is_made_on_first_use_only():
    proc = _python("import sys, corral.ext\n"
                   "print(sorted(m for m in sys.modules if m.startswith('corral.ext.')))",
                   "rust")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_unknown_attribute():
    with pytest.raises(AttributeError, match=r"^module 'corral.ext' has no attribute 'nope'$"):
        corral.ext.nope  # noqa: B018


def test_both_implementations_define_every_api_name():
    # STREAM_API is the one list of the token core's names (the twin's __all__ is made from it)
    twin = importlib.import_module("corral.ext._stream_py")
    assert sorted(twin.__all__) == sorted(corral.ext.STREAM_API)
    impls = [twin] + ([importlib.import_module("corral.ext._stream")] if BUILT else [])
    for impl in impls:
        missing = sorted(name for name in corral.ext.STREAM_API if not hasattr(impl, name))
        assert missing == [], f"{impl.__name__} lacks {missing}"
    chosen = importlib.import_module(corral.ext.TokenStream.__module__)
    for name in sorted(corral.ext.STREAM_API):
        assert getattr(corral.ext, name) is getattr(chosen, name)
