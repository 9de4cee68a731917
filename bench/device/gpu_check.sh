#!/bin/bash
# Device check for a machine with an NVIDIA GPU (run as root from the repository root; $OUT
# is where the log goes): one deep-task attempt (AttemptRunner, the code the local shim and the
# Ray actor run) is granted /dev/nvidia0, /dev/nvidiactl and /dev/nvidia-uvm and runs
# `nvidia-smi -L` in its sandbox; a second one, granted nothing, runs the same. Only the first
# may see the GPU. Needs no virtualenv: it links the tree as the `corral` package and, where
# the prebuilt extensions do not fit the local Python, compiles the generated C with gcc.
#   OUT=/tmp bash bench/device/gpu_check.sh
set -u
OUT=${OUT:-/tmp}
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "== host"; uname -r; id -u; ls -l /dev/nvidia* 2>&1 | head; command -v nvidia-smi; nvidia-smi -L 2>&1 | head -3
for p in python3.11 python3; do command -v $p && $p -V; done
PY=$(command -v python3.11 || command -v /usr/bin/python3.12 || command -v python3)
echo "== python $PY"
mkdir -p /tmp/pkg/corral && touch /tmp/pkg/corral/__init__.py
for d in runtime sandbox ext; do ln -sfn "$PWD/$d" /tmp/pkg/corral/$d; done
ln -sfn "$PWD/proto/corral/v1" /tmp/pkg/corral/v1
export PYTHONPATH=/tmp/pkg
$PY -c "import corral.ext._spawn, corral.sandbox; print('imports ok')" || {
  echo "== compiled ext unusable here; trying gcc"
  for m in _spawn _stream; do
    gcc -O2 -shared -fPIC $($PY-config --includes 2>/dev/null || echo -I/usr/include/python3) ext/$m.c -o ext/$m$($PY-config --extension-suffix) || true
  done
  $PY -c "import corral.ext._spawn, corral.sandbox; print('imports ok after gcc')" || exit 3
}
DEVS=$(ls /dev/nvidiactl /dev/nvidia0 /dev/nvidia-uvm 2>/dev/null | tr '\n' ' ')
echo "== devices granted: $DEVS"
$PY - "$DEVS" <<'PYEOF'
import json, os, sys, tempfile, time
from corral.runtime.tasks.runner import AttemptPlan, AttemptRunner
from corral.runtime.tasks.files import TaskFiles
devs = sys.argv[1].split()
root = tempfile.mkdtemp(prefix="gpucheck-")
def attempt(task_id, devices, argv):
    plan = AttemptPlan(task_id=task_id, attempt=1, argv=argv, devices=devices, tasks_root=root,
                       sandbox={"memory_bytes": 2 << 30, "pids_max": 512})
    t0 = time.time()
    outcome = AttemptRunner(plan).run()
    log = open(os.path.join(TaskFiles(root, task_id).attempt_dir(1), "log"), errors="replace").read()
    print(f"--- {task_id} devices={devices} {time.time()-t0:.2f}s outcome={outcome}\n{log}")
    return outcome, log
probe = ["sh", "-c", "ls -l /dev | grep -i nvidia; nvidia-smi -L; echo rc=$?"]
g, glog = attempt("task-granted", devs, probe)
n, nlog = attempt("task-plain", [], probe)
ok = "H200" in glog and "H200" not in nlog
print(json.dumps({"granted_sees_gpu": "H200" in glog, "plain_sees_gpu": "H200" in nlog, "ok": ok}))
PYEOF
