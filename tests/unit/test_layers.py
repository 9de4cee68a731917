"""The layering of docs/architecture.md holds: .importlinter's contracts pass on the tree.

An import that crosses a layer the wrong way (sandbox/ reaching for gRPC, the domain for a
servicer, the client for the daemon's config) fails here, naming the chain of imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: grimp (under lint-imports) takes corral.runtime etc. as root packages only while their
#: parent is a namespace package; `corral` itself is the SDK (runtime/sdk/), a real one.
#: With proto/ first on the path, the checker's process finds proto/corral, a namespace,
#: and maps the subpackages exactly as the install does. `make lint` does the same.
LINT_ENV = {**os.environ, "PYTHONPATH": "proto"}


def _lint_imports() -> list[str]:
    script = Path(sys.executable).with_name("lint-imports")
    assert script.exists() or shutil.which("lint-imports"), \
        "import-linter is a dev dependency (pyproject [dev]); `make build` installs it"
    return [str(script) if script.exists() else "lint-imports", "--no-cache"]


def test_every_layer_contract_is_kept():
    done = subprocess.run(_lint_imports(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=LINT_ENV)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _lint_with(config: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """lint-imports run on the tree with `config` as its contracts."""
    contracts = tmp_path / "contracts.ini"
    contracts.write_text(config)
    return subprocess.run([*_lint_imports(), str(contracts)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=LINT_ENV)


def test_a_forbidden_import_is_caught(tmp_path):
    # the checker sees real imports: the daemon (the composition root) imports the
    # servicers, so a contract forbidding that must break
    config = (ROOT / ".importlinter").read_text()
    done = _lint_with(config + "\n[importlinter:contract:canary]\nname = canary\n"
                               "type = forbidden\nsource_modules =\n    corral.runtime.daemon\n"
                               "forbidden_modules =\n    corral.runtime.api\n", tmp_path)
    assert done.returncode == 1
    assert "canary BROKEN" in done.stdout


def test_the_client_takes_only_the_sparse_walk_from_the_bottom_layer(tmp_path):
    # without its one allowed import the client contract breaks on exactly that import:
    # the client does share corral.ext.sparse, and the rest of corral.ext stays forbidden
    config = (ROOT / ".importlinter").read_text()
    allowance = "ignore_imports =\n    corral.runtime.client -> corral.ext.sparse\n"
    assert allowance in config
    done = _lint_with(config.replace(allowance, ""), tmp_path)
    assert done.returncode == 1
    assert "The client speaks only the wire API BROKEN" in done.stdout
    assert "corral.runtime.client -> corral.ext.sparse" in done.stdout
    assert "Contracts: 5 kept, 1 broken." in done.stdout
