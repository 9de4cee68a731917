"""A process SIGKILLed in the middle of a snapshot leaves nothing that looks complete: no
record, so nothing to list, get or fork; sweep removes the half; the frozen sandbox it
left is thawed (so its PDEATHSIG lands) and removed by the native sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from corral.sandbox import workspace_fs
from corral.sandbox.backends import native
from corral.sandbox.state.snapshots import SnapshotNotFound

from ..processes import wait_until

#: The capturing process: a sandbox with five 100 kB files, a snapshot that stops for good
#: at `stage` (after the first file is copied, or with its layers stored but no record),
#: telling the test by creating the file `ready`.
CAPTURER = textwrap.dedent("""
    import sys, time
    from corral.sandbox import Sandbox, SandboxSpec
    from corral.sandbox.state import layers, snapshots
    root, stage, ready = sys.argv[1:4]

    def stop(*args, **kwargs):
        open(ready, "w").close()
        time.sleep(600)

    real_copy = layers._copy_hashed
    def copy_then_stop(*args):
        done = real_copy(*args)
        stop()
        return done

    if stage == "copy":
        layers._copy_hashed = copy_then_stop
    else:
        snapshots.SnapshotStore._write_record = stop
    sb = Sandbox(SandboxSpec())
    sb.start()
    p = sb.exec(["/bin/sh", "-c", "for i in 1 2 3 4 5; do head -c 100000 /dev/zero > f$i; done"])
    p.communicate()
    print(sb.id, flush=True)
    sb.snapshot(snapshots.SnapshotStore(root), name="half")
""")


@pytest.mark.parametrize("stage", ["copy", "commit"])
def test_sigkill_mid_snapshot_leaves_no_complete_looking_half(store, tmp_path, stage):
    ready = str(tmp_path / "ready")
    child = subprocess.Popen([sys.executable, "-c", CAPTURER, store.root, stage, ready],
                             stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id = child.stdout.readline().strip()
        assert wait_until(lambda: os.path.exists(ready), timeout_s=60)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
        child.stdout.close()
    assert store.list() == []
    with pytest.raises(SnapshotNotFound):
        store.get("half")
    temps = os.listdir(os.path.join(store.root, "tmp"))
    layers = os.listdir(os.path.join(store.root, "layers/sha256"))
    # killed while copying: only a temp directory; killed before the record: stored layers
    # that no record names (content-addressed, so never half: renamed in whole)
    assert (len(temps), len(layers)) == ((1, 0) if stage == "copy" else (1, 1))
    swept = store.sweep()
    assert (swept.temp_dirs, len(swept.layers)) == (1, len(layers))
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    assert os.listdir(os.path.join(store.root, "layers/sha256")) == []
    # the sandbox it froze: the first sweep thaws it (its PDEATHSIG lands), a later one
    # removes what is left
    runtime = os.path.join(native.runtime_base(), sandbox_id)
    native.sweep()
    assert wait_until(lambda: sandbox_id in native.sweep() or not os.path.exists(runtime),
                      timeout_s=10)
    assert not os.path.exists(runtime)
    assert not os.path.exists(os.path.join(workspace_fs.root(), sandbox_id))
