"""A deep task's workspace (a tmpfs made by the daemon) is idmapped into each attempt.

Each attempt runs in a sandbox with its own id range, yet what an earlier attempt left
(its checkpoint, restored into the new workspace) is the new attempt's root's to change:
the workspace belongs to the daemon's user on the host and is idmapped onto whichever
range the attempt has.
"""

from __future__ import annotations

from corral.sandbox import ids

from .helpers import SUCCEEDED, wait_done

ONE_SLOT = """
[[nodes]]
name = "solo"
labels = { pool = "solo" }
resources = { cpu = 1 }
"""

#: Attempt 1 checkpoints a file and fails; attempt 2 appends to the restored file (it must
#: be its root's) and reports both maps.
SCRIPT = r"""
set -e
ck="$CORRAL_CHECKPOINT_DIR/state.txt"
map=$(cut -c1-40 /proc/self/uid_map | tr -s ' ')
if [ "$CORRAL_ATTEMPT" = 1 ]; then
    echo "attempt 1 $map" > "$ck"
    python3 -c 'import corral_agent; corral_agent.checkpoint(b"1")'
    exit 3
fi
echo "attempt 2 $map" >> "$ck"
mkdir -p /workspace/out
stat -c '%u %g' "$ck" /workspace > /workspace/out/owners.txt
cp "$ck" /workspace/out/maps.txt
"""


def test_a_retried_attempt_owns_what_the_first_left(task_daemon):
    c = task_daemon(ONE_SLOT).client()
    t = c.submit_task(["sh", "-c", SCRIPT], retries=1)
    done = wait_done(c, t.id, timeout_s=120)
    assert done.state == SUCCEEDED, done.reason
    assert done.attempt == 2
    files = {f.path: f.content.decode() for f in c.task_result(t.id).files}
    assert files["owners.txt"] == "0 0\n0 0\n"
    lines = files["maps.txt"].splitlines()
    assert [line.split()[:2] for line in lines] == [["attempt", "1"], ["attempt", "2"]]
    pool = ids.pool()
    bases = [int(line.split()[3]) for line in lines]
    for base in bases:
        assert pool.start <= base < pool.end
