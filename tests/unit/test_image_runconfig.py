"""The image config applied as `docker run` does (sandbox/images/runconfig.py), the mount
plan of a sandbox on an image, and the spec's `image` field."""

from __future__ import annotations

import os

import pytest

from corral.sandbox import InvalidSpec, SandboxSpec, mounts
from corral.sandbox.images import runconfig


def test_args_replace_cmd_and_keep_the_entrypoint():
    config = {"Entrypoint": ["/bin/tool", "--flag"], "Cmd": ["default"]}
    assert runconfig.command(config, []) == ["/bin/tool", "--flag", "default"]
    assert runconfig.command(config, ["x", "y"]) == ["/bin/tool", "--flag", "x", "y"]
    assert runconfig.command({"Cmd": ["/bin/sh"]}, []) == ["/bin/sh"]
    assert runconfig.command({"Cmd": ["/bin/sh"]}, ["id"]) == ["id"]
    with pytest.raises(InvalidSpec, match="no command given and the image has no"):
        runconfig.command({}, [])


def test_the_spec_env_wins_over_the_image_env():
    config = {"Env": ["PATH=/img/bin", "A=1", "B=2", "malformed"]}
    assert runconfig.environment(config, (("B", "spec"),)) == {"PATH": "/img/bin", "A": "1"}


def test_unsupported_keys_make_one_note():
    assert runconfig.notes({"Env": [], "Volumes": None}) == []
    assert runconfig.notes({"Healthcheck": {"Test": ["x"]}, "Shell": ["/bin/sh"]}) == [
        "image config Healthcheck, Shell not honoured by corral run (see docs/images.md)"]


@pytest.fixture
def root(tmp_path):
    os.mkdir(tmp_path / "etc")
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\napp:x:1000:1001::/:\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("spec, ids", [
    ("", None), ("0", (0, 0)), ("1000", (1000, 1001)), ("1234", (1234, 0)),
    ("1000:7", (1000, 7)), ("app", (1000, 1001)), ("app:staff", (1000, 50)),
    ("1234:staff", (1234, 50)),
])
def test_user_forms(root, spec, ids):
    assert runconfig.user(spec, root) == ids


def test_unresolvable_users_are_refused(root):
    with pytest.raises(InvalidSpec, match="no user 'ghost' in its /etc/passwd"):
        runconfig.user("ghost", root)
    with pytest.raises(InvalidSpec, match="no group 'wheel' in its /etc/group"):
        runconfig.user("app:wheel", root)


def test_a_symlinked_passwd_is_not_followed(tmp_path):
    os.mkdir(tmp_path / "etc")
    os.symlink("/etc/passwd", tmp_path / "etc" / "passwd")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            runconfig.user("root", fd)
        assert info.value.errno == 40  # ELOOP
    finally:
        os.close(fd)


def test_the_plan_attaches_the_image_root_and_binds_no_host_system_dir():
    spec = SandboxSpec(image="oci:/img", uid_base=100000)
    ops = mounts.plan(spec, "/r", "/ws", host=_Host(), image_root=9)
    assert ops[1] == mounts.MountOp("attach", "/r", flags=9)
    targets = {op.target for op in ops}
    assert not targets & {"/r/usr", "/r/bin", "/r/lib", "/r/etc/passwd", "/r/etc/ld.so.cache"}
    assert not any(op.kind == "file" for op in ops)  # /etc files are in the upper layer
    assert ops[-3] == mounts.MountOp("pivot", "/r")
    assert ops[-2] == mounts.MountOp("setattr", "/", flags=mounts.READ_ONLY, mode=0)
    default = mounts.plan(SandboxSpec(uid_base=100000), "/r", "/ws", host=_Host())
    # /dev is a tmpfs of its own on an image (nothing of it lands in the image's upper
    # layer), a bind of the root tmpfs's own directory on the default root
    dev = ops.index(mounts.MountOp("mkdir", "/r/dev", mode=0o755))
    default_dev = default.index(mounts.MountOp("mkdir", "/r/dev", mode=0o755))
    assert ops[dev + 1] == mounts.MountOp("mount", "/r/dev", source="tmpfs", fstype="tmpfs",
                                          flags=mounts.MS_NOSUID | mounts.MS_NOEXEC,
                                          data=f"mode=0755,size={64 << 20}")
    assert default[default_dev + 1] == mounts.MountOp("mount", "/r/dev", source="/r/dev",
                                                      flags=mounts.MS_BIND)
    # everything after it is the default plan's, but /tmp: a tmpfs of its own on an image
    # (writes to a directory of the root would land in the image's upper layer)
    tmp = ops.index(mounts.MountOp("mkdir", "/r/tmp", mode=0o1777))
    default_tmp = default.index(mounts.MountOp("mkdir", "/r/tmp", mode=0o1777))
    assert ops[dev + 2:tmp] == default[default_dev + 2:default_tmp]
    assert ops[tmp + 1] == mounts.MountOp("mount", "/r/tmp", source="tmpfs", fstype="tmpfs",
                                          flags=mounts.MS_NOSUID | mounts.MS_NODEV,
                                          data=f"mode=1777,size={64 << 20}")
    assert ops[tmp + 2:-2] == default[default_tmp + 3:-2]


class _Host(mounts.HostView):
    def kind(self, path):
        return "dir" if path in ("/usr", "/ws") else ("file" if path.startswith("/dev/")
                                                      or path.startswith("/etc/") else None)


def test_spec_image_field():
    assert SandboxSpec().image == ""
    assert SandboxSpec.build(image="oci:/x").image == "oci:/x"
    assert SandboxSpec(image="oci:/x", backend="docker").image == "oci:/x"  # both backends
    with pytest.raises(InvalidSpec, match="must be an image REF"):
        SandboxSpec(image="oci:/x\0")
