"""The pure checks of sandbox/effective.py: mount tables and limits against a spec."""

from __future__ import annotations

from corral.sandbox import BindMount, SandboxSpec
from corral.sandbox.effective import _mount_problems, format_table, mismatches


def mount(target, options, fstype="tmpfs", source="tmpfs"):
    return {"target": target, "options": options, "fstype": fstype, "source": source}


GOOD = [
    mount("/", "rw,relatime"), mount("/", "ro,nosuid,nodev,relatime"),
    mount("/usr", "ro,nosuid,nodev,relatime", "ext4", "/dev/vda"),
    mount("/dev/null", "rw,nosuid,noexec", "devtmpfs", "devtmpfs"),
    mount("/proc", "rw,nosuid,nodev,noexec", "proc", "proc"),
    *[mount(p, "ro,nosuid", "proc", "proc")
      for p in ("/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs", "/proc/sysvipc")],
    mount("/proc/kcore", "rw,relatime", "devtmpfs", "devtmpfs"),
    mount("/tmp", "rw,nosuid,nodev"), mount("/workspace", "rw,nosuid,nodev", "ext4", "/dev/vda"),
]


def test_the_default_mount_table_passes():
    assert _mount_problems(GOOD, SandboxSpec()) == []


def test_writable_root_host_paths_and_open_proc_are_flagged():
    bad = [m if m["target"] != "/usr" else mount("/usr", "rw,relatime", "ext4", "/dev/vda")
           for m in GOOD if m["target"] != "/proc/sys"]
    bad.append(mount("/", "rw,relatime"))
    bad.append(mount("/proc/sysrq-trigger", "rw", "proc", "proc"))
    assert _mount_problems(bad, SandboxSpec()) == [
        "the root filesystem is writable",
        "/proc/sys is not a read-only mount",
        "/usr is mounted writable (ext4 /dev/vda)",
        "/proc/sysrq-trigger is mounted writable (proc proc)",
    ]


def test_granted_writable_binds_are_not_flagged(tmp_path):
    spec = SandboxSpec(binds=(BindMount(str(tmp_path), "/data", writable=True),))
    table = [*GOOD, mount("/data", "rw,nosuid", "ext4", "/dev/vda"),
             mount("/data/sub", "rw,nosuid", "ext4", "/dev/vda")]
    assert _mount_problems(table, spec) == []
    assert _mount_problems(table, SandboxSpec()) == [
        "/data is mounted writable (ext4 /dev/vda)",
        "/data/sub is mounted writable (ext4 /dev/vda)"]


def test_limits_and_links_against_the_spec():
    spec = SandboxSpec(memory_bytes=64 << 20, pids_max=10, cpus=None)
    rep = {"sandbox_id": "sbx-1", "init_pid": 1, "processes": [],
           "cgroup_limits": {"memory.max": str(64 << 20), "pids.max": "10",
                             "cpu.max": "max 100000"},
           "landlock": {"host_abi": 0, "new_commands": "not probed",
                        "running_processes": "-"},
           "network": {"links": [{"name": "lo", "state": "UNKNOWN", "kind": "",
                                  "addresses": []}], "routes": []}}
    assert mismatches(rep, spec) == []
    rep["cgroup_limits"]["cpu.max"] = "50000 100000"
    rep["network"]["links"].append({"name": "eth0", "state": "UP", "kind": "veth",
                                    "addresses": []})
    problems = mismatches(rep, spec)
    assert problems == ["cgroup CPU quota is 50000 per 100000us, spec says None",
                        "network: spec allows no egress, but links ['eth0', 'lo'] exist"]
    assert "!!! 2 MISMATCH(ES) WITH THE SPEC !!!" in format_table(rep, problems)
