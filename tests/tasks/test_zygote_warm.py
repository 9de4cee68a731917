"""The shim zygote's warm-up and the files a running attempt rewrites without fsync."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from corral.runtime.tasks.files import replace_live

WARM = """
import json, threading
from corral.runtime.tasks import zygote
from corral.sandbox import contain
from corral.sandbox.backends import native
zygote._warm_sandbox_start()
print(json.dumps({"threads": threading.active_count(), "swept": native.Sandbox._swept,
                  "base_namespaces": [fd >= 0 for fd in contain._base_namespaces.values()]}))
"""


def test_the_zygote_warms_the_whole_first_start_and_stays_forkable():
    """After the warm-up the zygote holds the base mount namespace every shim inherits,
    runs no thread (forking stays safe), and has not taken the shims' sweep from them."""
    out = subprocess.run([sys.executable, "-c", WARM], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warming the sandbox start failed" not in out.stderr, out.stderr[-2000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["threads"] == 1
    assert state["swept"] is False
    assert state["base_namespaces"] == [True]


def test_replace_live_swaps_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "progress.json"
    replace_live(str(path), b'{"step": 1}')
    replace_live(str(path), b'{"step": 2}')
    assert json.loads(path.read_bytes()) == {"step": 2}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["progress.json"]
