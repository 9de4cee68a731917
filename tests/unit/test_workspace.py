"""The workspace file API never leaves the workspace, whatever the sandbox planted there."""

import os

import pytest

from corral.sandbox.errors import InvalidSpec, NotFound, PermissionDenied
from corral.sandbox.workspace import Workspace, relative


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "secret").write_text("host secret")
    return Workspace(str(root), os.getuid(), os.getgid())


@pytest.mark.parametrize(
    ("given", "expected"),
    [("a.txt", "a.txt"), ("/workspace/a/b", "a/b"), ("/workspace", "."), ("./x", "x"), ("", ".")],
)
def test_relative(given, expected):
    assert relative(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [("/etc/passwd", r"^path: '/etc/passwd' is outside /workspace$"),
     ("../secret", r"^path: '\.\./secret' must not contain '\.\.'$"),
     ("a\0b", r"^path: contains a NUL byte$")],
)
def test_relative_rejects(given, message):
    with pytest.raises(InvalidSpec, match=message):
        relative(given)


def test_write_read_list(ws):
    assert ws.write("hello.txt", b"hi there", 0o600) == 8
    assert ws.read("/workspace/hello.txt") == (b"hi there", False)
    assert ws.read("hello.txt", max_bytes=2) == (b"hi", True)
    os.mkdir(os.path.join(ws.root, "sub"))
    [f, d] = ws.list()
    assert (f.name, f.kind, f.size, f.mode) == ("hello.txt", "file", 8, 0o600)
    assert (d.name, d.kind) == ("sub", "dir")


def test_absolute_symlink_out_is_refused(ws):
    os.symlink("/etc", os.path.join(ws.root, "etc"))
    with pytest.raises(PermissionDenied, match=r"resolves outside the workspace$"):
        ws.read("etc/passwd")


def test_relative_symlink_escaping_is_refused(ws):
    os.symlink("../secret", os.path.join(ws.root, "up"))
    with pytest.raises(PermissionDenied):
        ws.read("up")
    os.mkdir(os.path.join(ws.root, "d"))
    os.symlink("../..", os.path.join(ws.root, "d", "out"))
    with pytest.raises(PermissionDenied, match=r"resolves outside the workspace$"):
        ws.read("d/out/secret")


def test_write_through_symlink_is_refused_and_host_file_unchanged(ws, tmp_path):
    os.symlink(str(tmp_path / "secret"), os.path.join(ws.root, "link"))
    with pytest.raises(PermissionDenied):
        ws.write("link", b"pwned")
    assert (tmp_path / "secret").read_text() == "host secret"


def test_magic_links_are_refused(ws):
    os.symlink("/proc/self/root", os.path.join(ws.root, "root"))
    with pytest.raises(PermissionDenied):
        ws.list("root")


def test_missing_and_wrong_kind(ws):
    with pytest.raises(NotFound, match=r"^'nope' does not exist in the workspace$"):
        ws.read("nope")
    os.mkfifo(os.path.join(ws.root, "fifo"))
    with pytest.raises(InvalidSpec, match=r"^path: 'fifo' is a FIFO, not a regular file$"):
        ws.read("fifo")
    with pytest.raises(InvalidSpec, match=r"^path: names the workspace itself, not a file$"):
        ws.write("/workspace", b"")
