"""Workspaces the caller brings are idmapped: the directory's owner is root inside.

Through the real CLI, as root: what the sandbox writes belongs on the host to the
directory's owner (root's own project, another user's directory, a 0700 mktemp -d), and a
hostile command cannot leave a setuid/setgid file, a device node, a file of another host
user or a hard link to a file outside (each refusal asserted by its errno).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CORRAL = str(Path(sys.executable).with_name("corral"))
#: A host id pair nobody on this machine has: the owner of the "someone else's" directory.
OTHER_UID, OTHER_GID = 4242, 4243

#: Runs inside with /workspace as its working directory; prints {probe: errno name or 0}.
HOSTILE = r"""
import errno, json, os, stat
out = {}
def t(name, fn):
    try:
        fn()
        out[name] = 0
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
open("f", "w").close()
os.mkdir("d")
t("chmod u+s", lambda: os.chmod("f", 0o4755))
t("chmod g+s dir", lambda: os.chmod("d", 0o2755))
t("fchmod 04755", lambda: os.fchmod(os.open("f", os.O_RDONLY), 0o4755))
t("fchmodat 06755", lambda: os.chmod("f", 0o6755, dir_fd=os.open(".", os.O_RDONLY)))
t("open O_CREAT 04755", lambda: os.close(os.open("s", os.O_CREAT | os.O_WRONLY, 0o4755)))
t("mknod char 1:3", lambda: os.mknod("n", 0o666 | stat.S_IFCHR, os.makedev(1, 3)))
t("mknod block 7:0", lambda: os.mknod("b", 0o600 | stat.S_IFBLK, os.makedev(7, 0)))
t("chown to 1000", lambda: os.chown("f", 1000, -1))
t("chgrp to 1000", lambda: os.chown("f", -1, 1000))
t("chown to 65534", lambda: os.chown("f", 65534, 65534))
t("link to /usr/bin/env", lambda: os.link("/usr/bin/env", "env"))
t("link to /tmp file", lambda: (open("/tmp/x", "w").close(), os.link("/tmp/x", "x")))
t("setxattr security.capability",
  lambda: os.setxattr("f", "security.capability", b"\x00\x00\x00\x02" + b"\x00" * 16))
print(json.dumps(out))
"""

EXPECTED = {
    "chmod u+s": "EPERM",            # seccomp: a mode with S_ISUID/S_ISGID
    "chmod g+s dir": "EPERM",
    "fchmod 04755": "EPERM",
    "fchmodat 06755": "EPERM",
    "open O_CREAT 04755": "EPERM",
    "mknod char 1:3": "EACCES",      # landlock: no make_char/make_block anywhere
    "mknod block 7:0": "EACCES",
    "chown to 1000": "EOVERFLOW",    # the idmap maps one id: no other host id exists here
    "chgrp to 1000": "EOVERFLOW",
    "chown to 65534": "EOVERFLOW",
    "link to /usr/bin/env": "EXDEV",  # another mount: no hard link across
    "link to /tmp file": "EXDEV",
    "setxattr security.capability": "EPERM",  # no CAP_SETFCAP
}


def corral(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CORRAL, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def owners(top: Path) -> dict[str, tuple[int, int, int]]:
    """relative path -> (uid, gid, mode) of everything under top (top excluded)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), top)] = (
                st.st_uid, st.st_gid, st.st_mode)
    return out


def test_readme_example_writes_out_txt_owned_by_the_directory_owner(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "Makefile").write_text("all:; echo built > out.txt\n")
    r = corral("run", "--workspace", "./proj", "--", "make", "-C", "/workspace",
               cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = proj / "out.txt"
    assert out.read_text() == "built\n"
    st = out.stat()
    assert (st.st_uid, st.st_gid) == (proj.stat().st_uid, proj.stat().st_gid) == (0, 0)


def test_mktemp_workspace_0700_is_the_sandbox_roots_own():
    workspace = tempfile.mkdtemp(prefix="corral-idmap-")
    try:
        assert stat.S_IMODE(os.stat(workspace).st_mode) == 0o700
        r = corral("run", "--workspace", workspace, "--", "sh", "-c",
                   "pwd; mkdir sub && echo x > sub/f && stat -c '%u %g %a' /workspace")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "/workspace\n0 0 700\n"
        assert owners(Path(workspace)) == {
            "sub": (0, 0, stat.S_IFDIR | 0o755), "sub/f": (0, 0, stat.S_IFREG | 0o644)}
    finally:
        subprocess.run(["rm", "-rf", workspace], check=True)


def test_another_users_directory_gets_that_users_files(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_GID)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, OTHER_UID + 1, OTHER_GID + 1)
    r = corral("run", "--workspace", str(theirs), "--rw", f"{data}:/data", "--", "sh", "-c",
               "echo a > a && echo b > /data/b && id -u && stat -c '%u %g' /workspace /data")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0\n0 0\n0 0\n"
    assert os.stat(theirs / "a")[4:6] == (OTHER_UID, OTHER_GID)
    assert os.stat(data / "b")[4:6] == (OTHER_UID + 1, OTHER_GID + 1)


def test_read_only_bind_of_a_private_directory_is_readable_not_writable(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("mine\n")
    os.chmod(private / "secret", 0o600)
    os.chown(private / "secret", OTHER_UID, OTHER_GID)
    os.chown(private, OTHER_UID, OTHER_GID)
    r = corral("run", "--ro", f"{private}:/p", "--", "sh", "-c",
               "cat /p/secret; touch /p/new 2>&1 | grep -o 'Read-only file system'")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "mine\nRead-only file system\n"
    assert sorted(os.listdir(private)) == ["secret"]


def test_hostile_command_leaves_nothing_dangerous_in_the_workspace(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    os.chown(workspace, OTHER_UID, OTHER_GID)
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    r = corral("run", "--workspace", str(workspace), "--ro", f"{script}:/hostile.py", "--",
               "python3", "/hostile.py")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == EXPECTED
    left = owners(workspace)
    assert left == {"f": (OTHER_UID, OTHER_GID, stat.S_IFREG | 0o644),
                    "d": (OTHER_UID, OTHER_GID, stat.S_IFDIR | 0o755)}


def test_unconfined_profile_is_refused_for_a_writable_directory_of_yours(tmp_path):
    r = corral("run", "--profile", "unconfined", "--workspace", str(tmp_path), "--", "true")
    assert r.returncode == 2
    assert r.stderr == (
        f"corral: run: profile: 'unconfined' has no seccomp filter, so nothing would stop the "
        f"sandbox leaving a setuid file in {tmp_path}, owned by uid 0 on the host; keep the "
        f"default profile (or one with its chmod, open and mknod mode rules) for a writable "
        f"directory of yours\n")
    r = corral("run", "--profile", "unconfined", "--ro", f"{tmp_path}:/x", "--", "true")
    assert r.returncode == 0, r.stderr


def test_a_filesystem_that_cannot_be_idmapped_is_named(tmp_path):
    """proc cannot be idmapped: the step, the path and EINVAL are named, with the fix."""
    r = corral("run", "--ro", "/proc/sys/kernel:/k", "--", "true")
    assert r.returncode == 125
    assert r.stderr.startswith(
        "corral: run: sandbox setup failed at mount_setattr(MOUNT_ATTR_IDMAP) "
        "'/proc/sys/kernel': EINVAL Invalid argument (its filesystem cannot be idmapped")


@pytest.mark.parametrize("flag", ["--workspace", "--rw"])
def test_files_made_through_the_idmap_survive_the_sandbox(tmp_path, flag):
    target = str(tmp_path) if flag == "--workspace" else f"{tmp_path}:/workspace/sub"
    path = "/workspace/kept" if flag == "--workspace" else "/workspace/sub/kept"
    r = corral("run", flag, target, "--", "sh", "-c", f"echo kept > {path}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "kept").read_text() == "kept\n"
    assert os.stat(tmp_path / "kept")[4:6] == (0, 0)


def test_a_mount_inside_the_workspace_that_cannot_be_idmapped_keeps_its_own_ids(tmp_path):
    """The directory is idmapped; an mqueue filesystem mounted inside it cannot be, so it
    is attached as it is: its files show as nobody's inside."""
    workspace = tmp_path / "ws"
    (workspace / "q").mkdir(parents=True)
    os.chown(workspace, OTHER_UID, OTHER_GID)
    subprocess.run(["mount", "-t", "mqueue", "mqueue", str(workspace / "q")], check=True)
    try:
        r = corral("run", "--workspace", str(workspace), "--", "sh", "-c",
                   "echo x > f && stat -c '%n %u' f q")
    finally:
        subprocess.run(["umount", str(workspace / "q")], check=True)
    assert (r.returncode, r.stdout) == (0, "f 0\nq 65534\n"), r.stderr
    assert os.stat(workspace / "f")[4:6] == (OTHER_UID, OTHER_GID)
