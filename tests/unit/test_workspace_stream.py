"""Files of any size, below the daemon: chunked uploads and downloads, the sans-IO tar reader
(whole, byte by byte, in random splits, with trailing garbage), confined extraction and its
caps, archiving a tree, stat/mkdir/remove/rename, and tree watches with their bounds."""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile

import pytest

from corral.sandbox import archive
from corral.sandbox.errors import InvalidSpec, NotFound, PermissionDenied, ResourceExhausted
from corral.sandbox.workspace import (
    WRITE_CLONE,
    AlreadyExists,
    Workspace,
)
from corral.sandbox.workspace_watch import TreeWatch, WatchEvent

MIB = 1 << 20


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(str(root), os.getuid(), os.getgid())


# -- upload / download ------------------------------------------------------------------------


def test_upload_in_chunks_resumes_and_digests_the_whole_file(ws):
    data = os.urandom(3 * MIB + 5)
    up = ws.upload("f.bin")
    up.write(data[:MIB])
    up.write(data[MIB:2 * MIB])
    up.close()  # the client went away after 2 MiB
    assert os.path.getsize(os.path.join(ws.root, "f.bin")) == 2 * MIB
    up = ws.upload("f.bin", offset=MIB + 3)  # resume before the end: cut there first
    up.write(data[MIB + 3:])
    assert up.finish() == (len(data), hashlib.sha256(data).hexdigest())
    up.close()
    with open(os.path.join(ws.root, "f.bin"), "rb") as f:
        assert f.read() == data
    # no write descriptor (and so no WRITE_CLONE turn) is held between chunks
    assert WRITE_CLONE._active == [0, 0]


def test_upload_refusals(ws):
    up = ws.upload("a")
    up.write(b"x" * 10)
    with pytest.raises(InvalidSpec, match=r"^chunk\.offset: 5 goes back before 10, where the "
                                          r"upload is; chunks come in order$"):
        up.write(b"y", offset=5)
    with pytest.raises(InvalidSpec, match=r"^end\.size: 4 is less than the 10 bytes written$"):
        up.finish(4)
    up.close()
    with pytest.raises(InvalidSpec, match=r"^offset: 11 is past the end of 'a' \(10 bytes\); "
                                          r"resume at most there$"):
        ws.upload("a", offset=11)
    with pytest.raises(NotFound):
        ws.upload("missing", offset=1)
    os.mkfifo(os.path.join(ws.root, "fifo"))
    with pytest.raises(InvalidSpec, match=r"^path: 'fifo' is a FIFO, not a regular file$"):
        ws.upload("fifo")
    os.symlink("/etc/passwd", os.path.join(ws.root, "pw"))
    with pytest.raises(PermissionDenied):
        ws.upload("pw")
    with pytest.raises(InvalidSpec, match=r"^path: names the workspace itself, not a file$"):
        ws.upload("/workspace")


def test_holes_are_neither_written_nor_sent(ws):
    up = ws.upload("s.bin")
    up.write(b"a" * 4096, offset=0)
    up.write(bytes(2 * MIB))  # all zeros: left as a hole
    up.write(b"b" * 4096, offset=64 * MIB)
    size, digest = up.finish(128 * MIB)
    up.close()
    full = b"a" * 4096 + bytes(64 * MIB - 4096) + b"b" * 4096 + bytes(64 * MIB - 4096)
    assert (size, digest) == (128 * MIB, hashlib.sha256(full).hexdigest())
    st = os.stat(os.path.join(ws.root, "s.bin"))
    assert st.st_blocks * 512 == 8192
    parts = list(ws.download("s.bin"))
    assert [(p[0], p[1]) for p in parts[1:]] == [("chunk", 0), ("chunk", 64 * MIB),
                                                 ("end", 128 * MIB)]
    assert parts[-1][2] == digest
    # from an offset: the digest still covers bytes 0..end
    tail = list(ws.download("s.bin", offset=64 * MIB, length=4096))
    assert tail[1] == ("chunk", 64 * MIB, b"b" * 4096)
    assert tail[2] == ("end", 64 * MIB + 4096,
                       hashlib.sha256(full[:64 * MIB + 4096]).hexdigest())


def test_logical_sizes_past_the_workspace_cap_are_refused(ws, monkeypatch):
    monkeypatch.setenv("CORRAL_WORKSPACE_BYTES", str(64 * MIB))
    up = ws.upload("a")
    with pytest.raises(InvalidSpec, match=r"^chunk\.offset: the file would reach 67108865 "
                                          r"bytes, over the workspace's cap of 67108864$"):
        up.write(b"x", offset=64 * MIB)
    with pytest.raises(InvalidSpec, match=r"^end\.size: 67108865 is over the workspace's cap"):
        up.finish(64 * MIB + 1)
    up.close()
    with open(os.path.join(ws.root, "giant"), "wb") as f:
        f.truncate(1 << 40)  # a sparse terabyte: hashing its holes would take an hour
    with pytest.raises(InvalidSpec, match=r"^path: 'giant' is 1099511627776 bytes \(sparse\), "
                                          r"over the workspace's cap of 67108864; download a "
                                          r"range that ends below it \(length\)$"):
        next(ws.download("giant"))
    assert [p[0] for p in ws.download("giant", length=MIB)] == ["stat", "end"]


# -- tar reader -------------------------------------------------------------------------------


def _tar(fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, data, link in (
                ("d", tarfile.DIRTYPE, b"", ""),
                ("d/" + "long" * 40 + ".txt", tarfile.REGTYPE, b"x" * 700, ""),
                ("d/empty", tarfile.REGTYPE, b"", ""),
                ("d/l", tarfile.SYMTYPE, b"", "empty"),
                ("d/h", tarfile.LNKTYPE, b"", "d/empty")):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname, info.mtime = kind, len(data), link, 1000
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _events(pieces) -> list:
    reader = archive.TarReader()
    out = []
    for piece in pieces:
        for kind, value in reader.feed(piece):
            if kind == "data":
                if out and out[-1][0] == "data":
                    out[-1] = ("data", out[-1][1] + bytes(value))
                    continue
                value = bytes(value)
            elif kind == "member":
                value = (value.name, value.kind, value.size, value.linkname)
            out.append((kind, value))
    reader.close()
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reader_gives_the_same_events_however_the_stream_is_split(fmt):
    raw = _tar(fmt)
    whole = _events([raw])
    name = "d/" + "long" * 40 + ".txt"
    assert whole == [
        ("member", ("d", "dir", 0, "")), ("member_end", None),
        ("member", (name, "file", 700, "")), ("data", b"x" * 700), ("member_end", None),
        ("member", ("d/empty", "file", 0, "")), ("member_end", None),
        ("member", ("d/l", "symlink", 0, "empty")), ("member_end", None),
        ("member", ("d/h", "hardlink", 0, "d/empty")), ("member_end", None),
        ("end", None)]
    assert _events([raw[i:i + 1] for i in range(len(raw))]) == whole
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(raw)), 12))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert _events(pieces) == whole
    assert _events([raw + os.urandom(3000)]) == whole  # after the end: ignored


def test_reader_refuses_a_cut_stream_a_bad_header_and_sparse_members():
    raw = _tar()
    reader = archive.TarReader()
    reader.feed(raw[:1500])
    with pytest.raises(InvalidSpec, match=r"^archive\.entries\[\d\]: the stream ends inside "
                                          r"this entry$"):
        reader.close()
    bad = bytearray(raw)
    bad[148:156] = b"0000000\0"  # checksum
    with pytest.raises(InvalidSpec, match=r"^archive\.entries\[0\]: not a tar header"):
        archive.TarReader().feed(bytes(bad))
    info = tarfile.TarInfo("s")
    info.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(InvalidSpec, match=r"^archive\.entries\[0\]: 's' is a sparse member"):
        archive.TarReader().feed(info.tobuf(tarfile.GNU_FORMAT))


# -- extraction -------------------------------------------------------------------------------


def _extract(ws, raw: bytes, path: str = ".", **caps) -> archive.ExtractReport:
    ex = ws.put_archive(path, max_bytes=caps.get("max_bytes", 1 << 30),
                        max_entries=caps.get("max_entries", 1000))
    try:
        for i in range(0, len(raw), 999):
            ex.feed(raw[i:i + 999])
        return ex.finish()
    finally:
        ex.close()


def _members(*specs) -> bytes:
    """One archive of (name, kind, data, link, mode) entries (defaults after the name)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for spec in specs:
            name, kind, data, link, mode = (*spec, tarfile.REGTYPE, b"", "", 0o644)[:5] \
                if len(spec) == 1 else (list(spec) + [tarfile.REGTYPE, b"", "", 0o644][
                    len(spec) - 1:])[:5]
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname, info.mode = kind, len(data), link, mode
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644) -> bytes:
    return _members((name, kind, data, link, mode))


def test_extraction_makes_what_the_archive_says(ws):
    r = _extract(ws, _tar())
    assert (r.files, r.dirs, r.symlinks, r.hardlinks, r.bytes) == (2, 1, 1, 1, 700)
    d = os.path.join(ws.root, "d")
    assert os.readlink(os.path.join(d, "l")) == "empty"
    assert os.stat(os.path.join(d, "h")).st_ino == os.stat(os.path.join(d, "empty")).st_ino
    assert os.stat(os.path.join(d, "empty")).st_mtime == 1000


@pytest.mark.parametrize("raw, message", [
    (_member("../x"), r"^archive\.entries\[0\]: name '\.\./x' leaves the target directory"),
    (_member("a/../../x"), r"^archive\.entries\[0\]: name 'a/\.\./\.\./x' leaves"),
    (_member("/abs"), r"^archive\.entries\[0\]: name '/abs' is absolute"),
    (_member("l", tarfile.SYMTYPE, link="../x"),
     r"^archive\.entries\[0\]: symlink 'l' -> '\.\./x' points outside the target directory$"),
    (_member("a/b/l", tarfile.SYMTYPE, link="../../../x"), r"points outside"),
    (_member("h", tarfile.LNKTYPE, link="/etc/passwd"), r"link target '/etc/passwd' is "
                                                        r"absolute"),
])
def test_extraction_refuses_what_would_leave_the_target(ws, raw, message):
    with pytest.raises(InvalidSpec, match=message):
        _extract(ws, raw)
    assert os.listdir(ws.root) == []


def test_extraction_stays_beneath_planted_links_and_keeps_no_special_bits(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(ws.root, "escape"))
    with pytest.raises(InvalidSpec, match=r"^archive\.entries\[0\]: 'escape': a parent is not "
                                          r"a directory \(or is a symlink"):
        _extract(ws, _member("escape/x", data=b"1"))
    assert os.listdir(outside) == []
    # a link inside the target is fine, and allowed to point inside
    r = _extract(ws, _member("a/b/l", tarfile.SYMTYPE, link="../c"))
    assert r.symlinks == 1
    r = _extract(ws, _members(("suid", tarfile.REGTYPE, b"#!", "", 0o6755),
                              ("dev", tarfile.CHRTYPE), ("fifo", tarfile.FIFOTYPE)))
    assert (r.files, r.skipped, r.skipped_names) == (1, 2, ["dev", "fifo"])
    assert stat.S_IMODE(os.stat(os.path.join(ws.root, "suid")).st_mode) == 0o755
    assert not os.path.exists(os.path.join(ws.root, "dev"))


def test_extraction_caps_bytes_and_entries_from_the_headers(ws):
    with pytest.raises(ResourceExhausted, match=r"^archive\.entries\[0\]: the archive holds "
                                                r"more than 100 bytes, the workspace's size cap"):
        _extract(ws, _member("big", data=b"x" * 101), max_bytes=100)
    assert os.listdir(ws.root) == []
    many = _members(*[(f"f{i}", tarfile.REGTYPE, b"1") for i in range(4)])
    with pytest.raises(ResourceExhausted, match=r"^archive\.entries\[3\]: the archive has more "
                                                r"than 3 entries, the workspace's inode cap$"):
        _extract(ws, many, max_entries=3)


def test_extraction_leaves_zero_runs_as_holes(ws):
    data = b"a" + bytes(8 * MIB) + b"b"
    _extract(ws, _member("sparse", data=data))
    path = os.path.join(ws.root, "sparse")
    with open(path, "rb") as f:
        assert f.read() == data
    assert os.stat(path).st_blocks * 512 < 4 * MIB


def test_tar_stream_archives_a_tree_and_leaves_fifos_out(ws):
    os.makedirs(os.path.join(ws.root, "t/sub"))
    with open(os.path.join(ws.root, "t/sub/f"), "wb") as f:
        f.truncate(3 * MIB)
        f.seek(MIB)
        f.write(b"z" * 10)
    os.symlink("sub/f", os.path.join(ws.root, "t/link"))
    os.mkfifo(os.path.join(ws.root, "t/fifo"))
    info, chunks = ws.archive("t")
    raw = b"".join(chunks)
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        names = [(m.name, m.type) for m in t.getmembers()]
        content = t.extractfile("t/sub/f").read()
    assert info.kind == "dir"
    assert names == [("t", tarfile.DIRTYPE), ("t/link", tarfile.SYMTYPE),
                     ("t/sub", tarfile.DIRTYPE), ("t/sub/f", tarfile.REGTYPE)]
    assert content == bytes(MIB) + b"z" * 10 + bytes(2 * MIB - 10)
    # and back in, somewhere else, stripped of its top directory
    os.mkdir(os.path.join(ws.root, "copy"))
    fd = os.open(os.path.join(ws.root, "copy"), os.O_RDONLY | os.O_DIRECTORY)
    ex = archive.TarExtractor(fd, max_bytes=1 << 30, max_entries=100, strip=1, owns_target=True)
    ex.feed(raw)
    ex.finish()
    assert sorted(os.listdir(os.path.join(ws.root, "copy"))) == ["link", "sub"]


# -- tree operations --------------------------------------------------------------------------


def test_stat_mkdir_remove_rename(ws):
    assert ws.mkdir("a/b", 0o700) == 2
    assert ws.mkdir("a/b") == 0
    with pytest.raises(AlreadyExists, match=r"^path: 'a/b' exists$"):
        ws.mkdir("a/b", parents=False)
    ws.write("a/f", b"1")
    with pytest.raises(InvalidSpec, match=r"^path: 'a/f' exists and is not a directory$"):
        ws.mkdir("a/f/g")
    assert (ws.stat("a/b").kind, ws.stat("a/b").mode) == ("dir", 0o700)
    ws.write("g", b"2")
    with pytest.raises(AlreadyExists, match=r"^to_path: 'a/f' exists \(no_replace\)$"):
        ws.rename("g", "a/f", no_replace=True)
    ws.rename("g", "a/f")
    assert ws.read("a/f") == (b"2", False)
    with pytest.raises(InvalidSpec, match=r"^to_path: cannot move 'a' to 'a/b/c'"):
        ws.rename("a", "a/b/c")
    with pytest.raises(NotFound, match=r"^from_path: 'nope' does not exist"):
        ws.rename("nope", "x")
    with pytest.raises(InvalidSpec, match=r"^recursive: 'a' is a directory that is not empty"):
        ws.remove("a")
    assert ws.remove("a", recursive=True) == "dir"
    assert os.listdir(ws.root) == []


# -- watches ----------------------------------------------------------------------------------


def test_watch_reports_new_subtrees_and_bounds_its_queue(ws):
    os.makedirs(os.path.join(ws.root, "w"))
    watch = TreeWatch(ws, "w", max_pending=3)
    try:
        assert watch.watched_dirs == 1
        os.makedirs(os.path.join(ws.root, "w/new/deep"))  # made before its watch is added
        watch.read()
        assert watch.take() == [WatchEvent("w/new", "created", True),
                                WatchEvent("w/new/deep", "created", True)]
        assert watch.watched_dirs == 3
        for i in range(10):
            with open(os.path.join(ws.root, f"w/new/deep/{i}"), "w"):
                pass
        watch.read()
        events = watch.take()
        assert events[0] == WatchEvent("w", "overflow", True, 0, 17)
        assert [e.kind for e in events[1:]] == ["created", "closed_write", "created"]
    finally:
        watch.close()


def test_watch_caps_its_directories(ws):
    for i in range(5):
        os.makedirs(os.path.join(ws.root, f"d{i}"))
    watch = TreeWatch(ws, ".", max_dirs=3)
    try:
        assert (watch.watched_dirs, watch.limited) == (3, 1)  # the walk stops at the cap
    finally:
        watch.close()
    with pytest.raises(InvalidSpec, match=r"^path: .*not a directory"):
        ws.write("file", b"")
        TreeWatch(ws, "file")
