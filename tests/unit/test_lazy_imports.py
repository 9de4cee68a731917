"""The command line and the client start without the native backend: corral.sandbox loads
its exports on first use (PEP 562), so `corral ps` does not pay for the spawner, seccomp and
the kernel-policy modules it never uses."""

from __future__ import annotations

import subprocess
import sys

import corral.sandbox as sandbox

HEAVY = ("corral.sandbox.backends.native", "corral.ext._spawn", "corral.sandbox.seccomp",
         "grpc")


def _loaded_after(statement: str) -> set[str]:
    probe = (f"import sys\n{statement}\n"
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(out.split())


def test_building_the_command_line_loads_no_backend_and_no_grpc():
    assert _loaded_after("from corral.runtime.cli import build_parser; build_parser()") == set()


def test_the_error_tree_and_exit_statuses_load_alone():
    assert _loaded_after("import corral.sandbox.errors, corral.sandbox.exit_status") == set()


def test_every_exported_name_resolves_to_its_module():
    for name in sandbox.__all__:
        value = getattr(sandbox, name)
        assert value is not None
    assert sorted(sandbox.__all__) == sorted(sandbox._EXPORTS)
    assert "Sandbox" in dir(sandbox)
    assert "corral.sandbox.backends.native" in _loaded_after("from corral.sandbox import Sandbox")


def test_an_unknown_name_is_an_attribute_error():
    try:
        sandbox.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "has no attribute 'NoSuchThing'" in str(exc)
    else:
        raise AssertionError("corral.sandbox.NoSuchThing resolved")
