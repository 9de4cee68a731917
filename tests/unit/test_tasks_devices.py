"""Device grants (SandboxSpec.devices) in the mount and landlock plans, and [[nodes]] config."""

from __future__ import annotations

import pytest

from corral.runtime.config import load
from corral.sandbox import SandboxSpec, landlock
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.mounts import ATTR_NOEXEC, ATTR_NOSUID, MS_BIND, plan


def test_a_device_may_not_shadow_a_node_corral_makes():
    with pytest.raises(InvalidSpec, match=r"^devices: '/dev/null' must be an absolute path"):
        SandboxSpec(devices=("/dev/null",))


def test_device_plan_and_landlock():
    spec = SandboxSpec()
    object.__setattr__(spec, "devices", ("/x/accel0",))  # the plan is pure: no host needed
    ops = plan(spec, "/root", "/ws")
    mounts = [(o.kind, o.source, o.target, o.flags) for o in ops]
    i = mounts.index(("mount", "/x/accel0", "/root/dev/accel0", MS_BIND))
    assert mounts[i - 1][:3] == ("touch", None, "/root/dev/accel0")
    assert mounts[i + 1] == ("setattr", None, "/root/dev/accel0", ATTR_NOSUID | ATTR_NOEXEC)
    assert i < [o.kind for o in ops].index("pivot")
    assert not any("accel0" in (o.target or "") for o in plan(SandboxSpec(), "/root", "/ws"))
    rules = dict(landlock.prepare(devices=("/dev/accel0",), abi=3).rules)
    assert rules["/dev/accel0"] == rules["/dev/null"]


def test_spec_refuses_what_is_not_a_device(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidSpec, match=r"^devices: .* is not a character or block device$"):
        SandboxSpec(devices=(str(f),))
    with pytest.raises(InvalidSpec, match=r"^devices: .* does not exist on the host$"):
        SandboxSpec(devices=(str(tmp_path / "nope"),))


def test_nodes_in_toml(tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text("""
[[nodes]]
name = "gpu-1"
labels = { pool = "deep", accelerator = "h200" }
resources = { cpu = 8, memory = "64G", "accelerator.h200" = 2 }
devices = { "accelerator.h200" = ["/dev/nvidia0", "/dev/nvidia1"] }

[[nodes]]
name = "ray-a"
executor = "ray"
labels = { zone = "a" }
resources = { cpu = 1 }
""")
    c = load(str(cfg), {})
    gpu, ray = c.nodes
    assert gpu.resources == {"cpu": 8.0, "memory": float(64 << 30), "accelerator.h200": 2.0}
    assert gpu.devices == {"accelerator.h200": ("/dev/nvidia0", "/dev/nvidia1")}
    assert (ray.executor, ray.labels) == ("ray", {"zone": "a"})
    cfg.write_text('[[nodes]]\nname = "x"\nlabels = { "Bad Key" = "v" }\n')
    with pytest.raises(InvalidSpec, match=r"^nodes\[x\]\.labels: 'Bad Key' is not a label key"):
        load(str(cfg), {})
    cfg.write_text('[[nodes]]\nname = "x"\ncolour = "red"\n')
    with pytest.raises(InvalidSpec, match=r"unknown setting 'colour'"):
        load(str(cfg), {})
