"""Files of any size through the real daemon and the real CLI: chunked upload and download
(2 GiB byte-exact with bounded daemon memory, resume, sparse), tar archives in and out with
their refusals, stat/mkdir/remove/rename, watches, `corral cp`, and the audit trail."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile

import grpc
import pytest

from corral.runtime.client import ClientError

from .daemon_harness import DaemonProcess, wait_until

GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture(scope="module")
def fdaemon(tmp_path_factory):
    # 2 GiB must fit the workspace: a 3 GiB tmpfs cap (memory is charged as it is written)
    d = DaemonProcess(tmp_path_factory.mktemp("files"),
                      args=("--workspace-size", "3G")).start()
    yield d
    assert d.stop() == 0, d.log()
    assert d.leftovers() == {}


@pytest.fixture(scope="module")
def fclient(fdaemon):
    return fdaemon.client()


@pytest.fixture
def sb(fclient):
    box = fclient.create_sandbox(memory_bytes=256 << 20)
    yield box
    fclient.destroy_sandbox(box.id)


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) << 10
    raise AssertionError(key)


def _write_pattern(path, size: int) -> str:
    """A file of `size` bytes in which every MiB differs (misplaced chunks show); its sha256."""
    block = bytearray(os.urandom(MIB))
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size // MIB):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.code


def _sh(client, sb_id: str, script: str) -> int:
    rc = None
    for event in client.exec(sb_id, ["sh", "-c", script]):
        if event.WhichOneof("event") == "exited":
            rc = event.exited.returncode
    return rc


# -- large files ------------------------------------------------------------------------------


def test_two_gib_round_trip_is_byte_exact_with_bounded_daemon_memory(fdaemon, fclient, sb,
                                                                     tmp_path):
    src, out = tmp_path / "src.bin", tmp_path / "out.bin"
    want = _write_pattern(src, 2 * GIB)
    rss_before = _vm(fdaemon.pid, "VmRSS")

    up = fclient.upload(sb.id, "big.bin", src)
    assert (up.size, up.sha256, up.bytes_received) == (2 * GIB, want, 2 * GIB)
    info = fclient.stat_file(sb.id, "/workspace/big.bin")
    assert (info.kind, info.size, info.allocated_bytes) == ("file", 2 * GIB, 2 * GIB)

    end = fclient.download(sb.id, "big.bin", out)
    assert (end.size, end.sha256) == (2 * GIB, want)
    src.unlink()
    assert _sha256(out) == want
    # constant memory per stream: the daemon's peak grew by far less than the file
    grown = _vm(fdaemon.pid, "VmHWM") - rss_before
    assert grown < 128 * MIB, f"daemon peak RSS grew by {grown >> 20} MiB for a 2 GiB file"


def test_resumed_upload_and_download_cover_the_whole_file(fclient, sb, tmp_path):
    src = tmp_path / "src.bin"
    want = _write_pattern(src, 24 * MIB)
    data = src.read_bytes()
    # an upload that stopped after 10 MiB (a chunk of 1 MiB still in flight is not there)
    first = fclient.upload(sb.id, "r.bin", [data[:10 * MIB]])
    assert first.size == 10 * MIB
    assert first.sha256 == hashlib.sha256(data[:10 * MIB]).hexdigest()
    done = fclient.upload(sb.id, "r.bin", src, offset=fclient.stat_file(sb.id, "r.bin").size)
    assert (done.size, done.sha256, done.bytes_received) == (24 * MIB, want, 14 * MIB)

    out = tmp_path / "out.bin"
    out.write_bytes(data[:5 * MIB])
    end = fclient.download(sb.id, "r.bin", out, offset=5 * MIB)
    assert (end.size, end.sha256) == (24 * MIB, want)
    assert out.read_bytes() == data

    with pytest.raises(ClientError) as err:
        fclient.upload(sb.id, "r.bin", src, offset=25 * MIB)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value) == ("INVALID_ARGUMENT: offset: 26214400 is past the end of 'r.bin' "
                              "(25165824 bytes); resume at most there")
    parts = list(fclient.download_parts(sb.id, "r.bin", offset=20 * MIB, length=MIB))
    assert [p.WhichOneof("part") for p in parts] == ["stat", "chunk", "end"]
    assert parts[1].chunk.offset == 20 * MIB and parts[1].chunk.data == data[20 * MIB:21 * MIB]
    assert parts[2].end.sha256 == hashlib.sha256(data[:21 * MIB]).hexdigest()


def test_sparse_files_stay_sparse_both_ways(fclient, sb, tmp_path):
    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:
        f.truncate(512 * MIB)
        f.seek(100 * MIB)
        f.write(b"a" * MIB)
        f.seek(400 * MIB)
        f.write(b"b" * 4096)
    want = _sha256(src)
    up = fclient.upload(sb.id, "sparse.bin", src)
    assert (up.size, up.sha256, up.bytes_received) == (512 * MIB, want, MIB + 4096)
    assert fclient.stat_file(sb.id, "sparse.bin").allocated_bytes == MIB + 4096
    out = tmp_path / "out.bin"
    end = fclient.download(sb.id, "sparse.bin", out)
    assert (end.size, end.sha256) == (512 * MIB, want)
    assert os.stat(out).st_size == 512 * MIB
    assert os.stat(out).st_blocks * 512 <= 2 * MIB  # written as holes, not zeros


def test_digest_mismatch_is_data_loss(fdaemon, sb):
    from corral.v1 import sandbox_pb2 as pb

    c = fdaemon.client()
    start = pb.UploadStart(sandbox_id=sb.id, path="d.bin", sha256="0" * 64)
    reqs = iter([pb.UploadRequest(start=start),
                 pb.UploadRequest(chunk=pb.FileChunk(data=b"hello"))])
    with pytest.raises(grpc.RpcError) as err:
        c.sandboxes.Upload(reqs, metadata=c.metadata)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert err.value.details() == (
        "sha256: the file has 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        ", not " + "0" * 64 + " as the client said; upload it again")
    with pytest.raises(grpc.RpcError) as err:
        c.sandboxes.Upload(iter([pb.UploadRequest(chunk=pb.FileChunk(data=b"x"))]),
                           metadata=c.metadata)
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "start: the first message must be a start")


# -- confinement ------------------------------------------------------------------------------


def test_every_new_call_keeps_the_symlink_and_dotdot_confinement(fclient, sb, tmp_path):
    assert _sh(fclient, sb.id, "ln -s /etc/passwd pw && ln -s / root && mkfifo fifo "
                               "&& mkdir d") == 0
    src = tmp_path / "x"
    src.write_bytes(b"x")

    def code(fn, *args, **kw):
        with pytest.raises(ClientError) as err:
            fn(*args, **kw)
        return err.value.code.name, str(err.value).partition(": ")[2]

    assert code(fclient.upload, sb.id, "pw", src) == (
        "PERMISSION_DENIED", "'pw' is or goes through a symlink that is not allowed")
    assert code(fclient.upload, sb.id, "root/etc/x", src) == (
        "PERMISSION_DENIED", "'root/etc/x' resolves outside the workspace")
    assert code(fclient.upload, sb.id, "fifo", src) == (
        "INVALID_ARGUMENT", "path: 'fifo' is a FIFO, not a regular file")
    assert code(fclient.upload, sb.id, "../x", src) == (
        "INVALID_ARGUMENT", "path: '../x' must not contain '..'")
    assert code(fclient.download, sb.id, "root/etc/passwd", tmp_path / "o") == (
        "PERMISSION_DENIED", "'root/etc/passwd' resolves outside the workspace")
    assert code(fclient.download, sb.id, "fifo", tmp_path / "o") == (
        "INVALID_ARGUMENT", "path: 'fifo' is a FIFO, not a regular file")
    assert code(fclient.get_archive, sb.id, "root/etc") == (
        "PERMISSION_DENIED", "'root/etc' resolves outside the workspace")
    assert code(fclient.make_dir, sb.id, "root/tmp/evil") == (
        "PERMISSION_DENIED", "'root' resolves outside the workspace")
    assert code(fclient.rename_file, sb.id, "d", "root/tmp/d") == (
        "PERMISSION_DENIED", "'root/tmp' resolves outside the workspace")
    assert code(fclient.remove_file, sb.id, "root/etc/passwd") == (
        "PERMISSION_DENIED", "'root/etc' resolves outside the workspace")
    assert code(fclient.watch_files(sb.id, "root").__next__) == (
        "PERMISSION_DENIED", "'root' resolves outside the workspace")
    # a link is described and removed, never followed
    assert fclient.stat_file(sb.id, "pw").link_target == "/etc/passwd"
    assert fclient.remove_file(sb.id, "root") == "symlink"
    assert os.path.isdir("/etc")


def _tar(*members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data, extra in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data)
            info.mode = extra.get("mode", 0o644)
            info.linkname = extra.get("link", "")
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def test_put_archive_extracts_safely_and_get_archive_gives_it_back(fclient, sb):
    fclient.make_dir(sb.id, "in")
    archive = _tar(("top", tarfile.DIRTYPE, b"", {}),
                   ("top/a.txt", tarfile.REGTYPE, b"alpha\n", {"mode": 0o6755}),
                   ("top/sub/b.txt", tarfile.REGTYPE, b"beta" * 5000, {}),
                   ("top/link", tarfile.SYMTYPE, b"", {"link": "sub/b.txt"}),
                   ("top/hard", tarfile.LNKTYPE, b"", {"link": "top/a.txt"}),
                   ("top/dev", tarfile.CHRTYPE, b"", {}),
                   ("top/fifo", tarfile.FIFOTYPE, b"", {}))
    r = fclient.put_archive(sb.id, "in", [archive[i:i + 1000]
                                          for i in range(0, len(archive), 1000)])
    assert (r.files, r.dirs, r.symlinks, r.hardlinks, r.bytes, r.skipped,
            list(r.skipped_names)) == (2, 1, 1, 1, 6 + 20000, 2, ["top/dev", "top/fifo"])
    assert fclient.stat_file(sb.id, "in/top/a.txt").mode == 0o755  # setuid/setgid dropped
    assert fclient.stat_file(sb.id, "in/top/link").link_target == "sub/b.txt"
    assert fclient.read_file(sb.id, "in/top/sub/b.txt") == b"beta" * 5000
    assert fclient.read_file(sb.id, "in/top/hard") == b"alpha\n"
    assert sorted(e.name for e in fclient.list_files(sb.id, "in/top")) == [
        "a.txt", "hard", "link", "sub"]

    info, chunks = fclient.get_archive(sb.id, "in/top")
    assert (info.kind, info.path) == ("dir", "in/top")
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as t:
        got = {m.name: (m.type, m.size, m.linkname) for m in t.getmembers()}
        assert t.extractfile("top/sub/b.txt").read() == b"beta" * 5000
    assert got == {"top": (tarfile.DIRTYPE, 0, ""), "top/a.txt": (tarfile.REGTYPE, 6, ""),
                   "top/hard": (tarfile.REGTYPE, 6, ""), "top/link": (tarfile.SYMTYPE, 0,
                                                                         "sub/b.txt"),
                   "top/sub": (tarfile.DIRTYPE, 0, ""),
                   "top/sub/b.txt": (tarfile.REGTYPE, 20000, "")}


@pytest.mark.parametrize("member, message", [
    (("../evil", tarfile.REGTYPE, b"x", {}),
     "archive.entries[0]: name '../evil' leaves the target directory ('..')"),
    (("/etc/evil", tarfile.REGTYPE, b"x", {}),
     "archive.entries[0]: name '/etc/evil' is absolute; archive paths are relative"),
    (("l", tarfile.SYMTYPE, b"", {"link": "../../etc"}),
     "archive.entries[0]: symlink 'l' -> '../../etc' points outside the target directory"),
    (("l", tarfile.SYMTYPE, b"", {"link": "/etc"}),
     "archive.entries[0]: symlink 'l' -> '/etc' points outside the target directory"),
    (("h", tarfile.LNKTYPE, b"", {"link": "../../etc/passwd"}),
     "archive.entries[0]: link target '../../etc/passwd' leaves the target directory ('..')"),
    (("out/etc/passwd", tarfile.REGTYPE, b"x", {}),
     "archive.entries[0]: 'out/etc': a parent is not a directory (or is a symlink, "
     "which extraction never follows)"),
])
def test_put_archive_refuses_entries_that_leave_the_target(fclient, sb, member, message):
    assert _sh(fclient, sb.id, "mkdir in && ln -s / in/out") == 0
    with pytest.raises(ClientError) as err:
        fclient.put_archive(sb.id, "in", [_tar(member)])
    assert (err.value.code, str(err.value).partition(": ")[2]) == (
        grpc.StatusCode.INVALID_ARGUMENT, message)
    assert not os.path.exists("/etc/evil")
    assert [e.name for e in fclient.list_files(sb.id, "in")] == ["out"]


def test_put_archive_is_bounded_by_the_workspace_cap(fclient, sb):
    # a header announcing 4 GiB: refused before a byte of it is written
    info = tarfile.TarInfo("huge")
    info.size = 4 * GIB
    header = info.tobuf(tarfile.PAX_FORMAT)
    with pytest.raises(ClientError) as err:
        fclient.put_archive(sb.id, "", [header, b"\0" * MIB])
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(err.value) == (f"RESOURCE_EXHAUSTED: archive.entries[0]: the archive holds more "
                              f"than {3 * GIB} bytes, the workspace's size cap")
    assert fclient.list_files(sb.id, "") == []


# -- tree operations --------------------------------------------------------------------------


def test_stat_mkdir_remove_rename(fclient, sb):
    assert fclient.make_dir(sb.id, "a/b/c", mode=0o750) == 3
    assert fclient.make_dir(sb.id, "a/b/c") == 0
    st = fclient.stat_file(sb.id, "a/b/c")
    assert (st.path, st.kind, st.mode) == ("a/b/c", "dir", 0o750)
    with pytest.raises(ClientError) as err:
        fclient.make_dir(sb.id, "a/b/c", parents=False)
    assert str(err.value) == "ALREADY_EXISTS: path: 'a/b/c' exists"
    with pytest.raises(ClientError) as err:
        fclient.make_dir(sb.id, "x/y", parents=False)
    assert str(err.value) == ("NOT_FOUND: path: the parent 'x' of 'x/y' does not exist; set "
                              "parents to make it")
    fclient.write_file(sb.id, "a/f", b"1")
    fclient.write_file(sb.id, "g", b"2")
    with pytest.raises(ClientError) as err:
        fclient.rename_file(sb.id, "g", "a/f", no_replace=True)
    assert str(err.value) == "ALREADY_EXISTS: to_path: 'a/f' exists (no_replace)"
    fclient.rename_file(sb.id, "g", "a/f")
    assert fclient.read_file(sb.id, "a/f") == b"2"
    with pytest.raises(ClientError) as err:
        fclient.remove_file(sb.id, "a")
    assert str(err.value) == ("INVALID_ARGUMENT: recursive: 'a' is a directory that is not "
                              "empty; set recursive to remove it")
    # a tree deeper than any recursion limit goes, iteratively
    assert _sh(fclient, sb.id, "python3 -c 'import os\nfor _ in range(1500):\n"
                               " os.mkdir(\"d\"); os.chdir(\"d\")' && mv d a/deep") == 0
    assert fclient.remove_file(sb.id, "a", recursive=True) == "dir"
    with pytest.raises(ClientError) as err:
        fclient.stat_file(sb.id, "a")
    assert str(err.value) == "NOT_FOUND: 'a' does not exist in the workspace"
    with pytest.raises(ClientError) as err:
        fclient.remove_file(sb.id, "/workspace")
    assert str(err.value) == "INVALID_ARGUMENT: path: names the workspace itself"


def test_watch_reports_changes_and_the_daemon_caps_watches(fdaemon, fclient, sb):
    fclient.make_dir(sb.id, "w")
    events = fclient.watch_files(sb.id, "w")
    first = next(events)
    assert (first.kind, first.path, first.dropped) == (1, "w", 1)  # WATCHING, 1 directory
    from corral.v1 import sandbox_pb2 as pb

    assert _sh(fclient, sb.id, "mkdir w/sub") == 0
    e = next(events)  # once seen, w/sub is watched too
    seen = [(pb.FileEventKind.Name(e.kind), e.path, e.is_dir)]
    assert _sh(fclient, sb.id, "echo hi > w/sub/f && mv w/sub/f w/g && rm w/g") == 0
    for e in events:
        seen.append((pb.FileEventKind.Name(e.kind), e.path, e.is_dir))
        if e.kind == pb.FILE_EVENT_KIND_DELETED:
            break
    assert seen == [("FILE_EVENT_KIND_CREATED", "w/sub", True),
                    ("FILE_EVENT_KIND_CREATED", "w/sub/f", False),
                    ("FILE_EVENT_KIND_MODIFIED", "w/sub/f", False),
                    ("FILE_EVENT_KIND_CLOSED_WRITE", "w/sub/f", False),
                    ("FILE_EVENT_KIND_MOVED_FROM", "w/sub/f", False),
                    ("FILE_EVENT_KIND_MOVED_TO", "w/g", False),
                    ("FILE_EVENT_KIND_DELETED", "w/g", False)]
    events.close()

    # at most 4 watches per tenant and 16 on a daemon (each is an inotify instance on the
    # daemon's quota)
    calls, made = [], []
    for n in range(4):
        c = fdaemon.client(tenant=f"w{n}")
        box = c.create_sandbox()
        made.append((c, box.id))
        for _ in range(4):
            call = c.sandboxes.WatchFiles(pb.WatchFilesRequest(sandbox_id=box.id),
                                          metadata=c.metadata)
            assert next(call).events[0].kind == pb.FILE_EVENT_KIND_WATCHING
            calls.append(call)
        if n == 0:
            with pytest.raises(ClientError) as err:
                next(c.watch_files(box.id))
            assert str(err.value) == ("RESOURCE_EXHAUSTED: tenant 'w0' already runs 4 file "
                                      "watches; end one first")
    with pytest.raises(ClientError) as err:
        next(fclient.watch_files(sb.id))
    assert str(err.value) == ("RESOURCE_EXHAUSTED: the daemon already runs 16 file watches; "
                              "end one first")
    for call in calls:
        call.cancel()
    for c, box_id in made:
        c.destroy_sandbox(box_id)

    def watch_again() -> bool:  # each cancel ends its watch on the daemon, freeing its turn
        try:
            stream = fclient.watch_files(sb.id)
            next(stream)
            stream.close()
            return True
        except ClientError:
            return False

    assert wait_until(watch_again)

    # a watch ends, quietly, when its sandbox goes
    other = fclient.create_sandbox()
    stream = fclient.watch_files(other.id)
    assert next(stream).kind == pb.FILE_EVENT_KIND_WATCHING
    fclient.destroy_sandbox(other.id)
    assert list(stream) == []


def test_file_calls_are_audited(fdaemon, fclient, sb, tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    fclient.upload(sb.id, "a", src)
    fclient.download(sb.id, "a", tmp_path / "b")
    fclient.rename_file(sb.id, "a", "c")
    recs = [(r.kind, r.detail_json) for r in fclient.audit_query(sandbox_id=sb.id)
            if r.kind.startswith("file.")]
    import json

    # (keys the daemon adds to every record, such as "corral.policy", are not the calls')
    got = [(k, {f: v for f, v in json.loads(d).items() if not f.startswith("corral.")})
           for k, d in recs]
    assert got == [
        ("file.upload", {"path": "a", "offset": 0, "bytes": 3, "size": 3,
                         "sha256": hashlib.sha256(b"abc").hexdigest(), "complete": True}),
        ("file.download", {"path": "a", "offset": 0, "length": 0}),
        ("file.rename", {"from_path": "a", "to_path": "c", "no_replace": False}),
    ]


# -- corral cp --------------------------------------------------------------------------------


def _cp(fdaemon, *args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", "cp", "--socket",
                           fdaemon.socket, *args], input=stdin, capture_output=True,
                          timeout=120, check=False)


def test_corral_cp_both_ways_as_docker_cp(fdaemon, fclient, sb, tmp_path):
    tree = tmp_path / "proj"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "main.py").write_text("print(1)\n")
    (tree / "README").write_text("hi\n")
    os.symlink("src/main.py", tree / "entry")
    single = tmp_path / "one.bin"
    single.write_bytes(os.urandom(3 * MIB + 7))

    # a file onto an existing directory goes into it
    r = _cp(fdaemon, str(single), f"{sb.id}:/workspace")
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode() == (f"copied 3.15MB to {sb.id}:/workspace/one.bin (sha256 "
                                 f"{hashlib.sha256(single.read_bytes()).hexdigest()})\n")
    # a directory to a new path becomes that path; to an existing one goes into it
    assert _cp(fdaemon, str(tree), f"{sb.id}:copy").returncode == 0
    assert _cp(fdaemon, str(tree), f"{sb.id}:copy").returncode == 0
    # '/.': the contents, into a new directory and then into the existing one
    assert _cp(fdaemon, f"{tree}/.", f"{sb.id}:flat").returncode == 0
    assert _cp(fdaemon, f"{tree}/.", f"{sb.id}:flat").returncode == 0
    assert sorted(e.name for e in fclient.list_files(sb.id, "copy")) == [
        "README", "entry", "proj", "src"]
    assert sorted(e.name for e in fclient.list_files(sb.id, "flat")) == ["README", "entry",
                                                                         "src"]
    assert fclient.read_file(sb.id, "copy/proj/src/main.py") == b"print(1)\n"
    assert fclient.stat_file(sb.id, "copy/proj/entry").link_target == "src/main.py"

    # and back
    back = tmp_path / "back"
    assert _cp(fdaemon, f"{sb.id}:copy", str(back)).returncode == 0
    assert sorted(os.listdir(back)) == ["README", "entry", "proj", "src"]
    assert os.readlink(back / "entry") == "src/main.py"
    assert _cp(fdaemon, f"{sb.id}:one.bin", str(back)).returncode == 0
    assert (back / "one.bin").read_bytes() == single.read_bytes()

    # '-': a tar stream on stdout and on stdin
    out = _cp(fdaemon, f"{sb.id}:flat/src", "-")
    assert out.returncode == 0 and out.stderr == b""
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as t:
        assert t.getnames() == ["src", "src/main.py"]
    fclient.make_dir(sb.id, "fromtar")
    r = _cp(fdaemon, "-", f"{sb.id}:fromtar", stdin=out.stdout)
    assert r.returncode == 0, r.stderr
    assert fclient.read_file(sb.id, "fromtar/src/main.py") == b"print(1)\n"

    # errors: one line, the right exit status
    r = _cp(fdaemon, f"{sb.id}:nope", str(tmp_path / "x"))
    assert (r.returncode, r.stderr.decode()) == (
        1, "corral: cp: NOT_FOUND: 'nope' does not exist in the workspace\n")
    r = _cp(fdaemon, str(tree), str(tmp_path / "y"))
    assert (r.returncode, r.stderr.decode()) == (
        2, "corral: cp: INVALID_ARGUMENT: exactly one of SRC and DEST must be SANDBOX:PATH\n")
