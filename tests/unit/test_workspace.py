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


def _in_thread(fn, timeout_s: float = 60.0):
    """fn()'s outcome from a thread; a call that blocks for good shows up as 'still blocked'."""
    import threading

    box: list = []

    def run():
        try:
            box.append(("ok", fn()))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            box.append(("raised", exc))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout_s)
    return box[0] if box else ("still blocked", None)


def test_write_onto_a_fifo_is_refused_without_waiting_for_a_reader(ws):
    os.mkfifo(os.path.join(ws.root, "input.txt"))
    kind, exc = _in_thread(lambda: ws.write("input.txt", b"hello"))
    assert kind == "raised" and isinstance(exc, InvalidSpec)
    assert str(exc) == "path: 'input.txt' is a FIFO, not a regular file"


def test_a_fifo_swapped_in_after_the_check_is_still_refused(ws, monkeypatch):
    """The O_PATH check and the open are two steps: the open alone must not block either."""
    os.mkfifo(os.path.join(ws.root, "input.txt"))
    monkeypatch.setattr(Workspace, "_check_kind", lambda self, path, must_exist: None)
    kind, exc = _in_thread(lambda: ws.write("input.txt", b"hello"))
    assert kind == "raised"
    assert str(exc) == "path: 'input.txt' is a FIFO or socket, not a regular file"
    reader = os.open(os.path.join(ws.root, "input.txt"), os.O_RDONLY | os.O_NONBLOCK)
    try:  # with a reader the open succeeds; fstat refuses before a byte is written
        kind, exc = _in_thread(lambda: ws.write("input.txt", b"hello"))
        assert str(exc) == "path: 'input.txt' is a FIFO, not a regular file"
        assert os.read(reader, 10) == b""
        kind, exc = _in_thread(lambda: ws.read("input.txt"))
        assert str(exc) == "path: 'input.txt' is a FIFO, not a regular file"
    finally:
        os.close(reader)


def test_write_to_a_leased_file_is_unavailable_not_a_wait(ws):
    """A read lease makes an open for writing wait up to lease-break-time (45 s)."""
    import subprocess
    import sys

    path = os.path.join(ws.root, "leased")
    with open(path, "w") as f:
        f.write("x")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({path!r}, os.O_RDONLY)\n"
         "fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        kind, exc = _in_thread(lambda: ws.write("leased", b"y"))
        assert kind == "raised"
        assert str(exc) == ("'leased' is held by a lease of a process in the sandbox; "
                            "try again later")
    finally:
        holder.stdin.close()
        holder.wait(30)


def test_listing_a_huge_directory_is_refused_not_read_whole(ws, monkeypatch):
    import corral.sandbox.workspace as workspace_mod
    from corral.sandbox.errors import ResourceExhausted

    monkeypatch.setattr(workspace_mod, "MAX_LIST_ENTRIES", 5)
    os.mkdir(os.path.join(ws.root, "many"))
    for i in range(6):
        open(os.path.join(ws.root, "many", str(i)), "w").close()
    with pytest.raises(ResourceExhausted, match=r"^'many' has more than 5 entries; list one "
                                                r"of its subdirectories or read files by name$"):
        ws.list("many")
    os.unlink(os.path.join(ws.root, "many", "0"))
    assert [e.name for e in ws.list("many")] == ["1", "2", "3", "4", "5"]


def test_list_entries_carry_the_facts_stat_gives(ws):
    os.makedirs(os.path.join(ws.root, "sub"))
    os.symlink("../elsewhere", os.path.join(ws.root, "sub", "link"))
    ws.write("sub/data", b"x" * 5000, 0o640)
    data, link = ws.list("/workspace/sub")
    assert (link.path, link.name, link.kind, link.link_target) == (
        "sub/link", "link", "symlink", "../elsewhere")
    assert (data.path, data.name, data.size, data.mode) == ("sub/data", "data", 5000, 0o640)
    assert data == ws.stat("sub/data")  # one answer for one file, whichever call gave it
