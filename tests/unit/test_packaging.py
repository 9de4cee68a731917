"""The wheel carries every package of the tree: pyproject lists packages by name, and one
left out works in the editable install the tests use but is missing from `pip install .`."""

from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_package_directory_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    # a folder mapped to a package of its own (runtime/sdk/ is `corral`) is not also a
    # subpackage of the folder above it
    mapped = {os.path.join(ROOT, folder) for folder in setuptools["package-dir"].values()}
    for name, folder in setuptools["package-dir"].items():
        base = os.path.join(ROOT, folder)
        for here, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"
                       and os.path.join(here, d) not in mapped]
            if "__init__.py" in files:
                rel = os.path.relpath(here, base)
                found.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    assert found - listed == set(), "packages missing from pyproject.toml"
    assert listed - found == set(), "pyproject.toml lists packages that do not exist"
