"""Every python example of docs/sdk.md runs, as written, against the real daemon.

Each block runs in its own interpreter with only $CORRAL_SOCKET pointing at the test daemon
(the way a reader runs it next to `corral daemon`); it must exit 0. A block that fails shows
its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fences of a markdown text, in order."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks(DOC.read_text())


def test_the_page_has_its_examples():
    # sandboxes, exec, files, snapshots, errors, sessions, tasks, asyncio
    assert len(BLOCKS) == 8
    assert sum("AsyncClient" in b for b in BLOCKS) == 1


def test_the_extraction_takes_only_python_fences():
    text = "x\n```python\na = 1\n```\n```sh\nnot python\n```\n```python\nb = 2\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n"]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_the_example_runs(daemon, index, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_SOCKET"] = daemon.socket
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (f"example {index + 1} of docs/sdk.md failed:\n"
                                  f"{BLOCKS[index]}\n--- output:\n{done.stdout}{done.stderr}")
