"""Files at any size through the typed SDK against the real daemon: chunked upload and
download with offsets (resume), holes, the sha256 both sides agree on, tar archives in and
out, and the watch stream, on corral.Client and corral.AsyncClient alike."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile

import grpc
import pytest

import corral
from corral import calls

#: Three and a half upload pieces: several chunks, the last one short.
BIG = os.urandom(3 * calls.PIECE + calls.PIECE // 2)


@pytest.fixture
def sb(daemon):
    with corral.Client(daemon.socket) as client, client.sandbox(memory="256M") as handle:
        yield handle


def test_upload_and_download_round_trip_byte_exact_in_chunks(sb, tmp_path):
    sent = sb.upload("big.bin", BIG, mode=0o600)
    digest = hashlib.sha256(BIG).hexdigest()
    assert sent == corral.Transfer(len(BIG), digest, len(BIG))
    assert (sb.stat("big.bin").size, sb.stat("big.bin").mode) == (len(BIG), 0o600)
    local = tmp_path / "big.bin"
    assert sb.download("big.bin", local) == corral.Transfer(len(BIG), digest, len(BIG))
    assert local.read_bytes() == BIG
    into = io.BytesIO()
    assert sb.download("big.bin", into, length=1000).size == 1000
    assert into.getvalue() == BIG[:1000]


def test_an_upload_resumes_at_an_offset_from_a_local_path(sb, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(BIG)
    cut = calls.PIECE + 17
    assert sb.upload("r.bin", BIG[:cut]).size == cut
    resumed = sb.upload("r.bin", source, offset=cut)
    assert (resumed.size, resumed.moved) == (len(BIG), len(BIG) - cut)
    assert resumed.sha256 == hashlib.sha256(BIG).hexdigest()
    with pytest.raises(corral.InvalidArgument,
                       match=r"^INVALID_ARGUMENT: offset: 6 is beyond the end of source"):
        sb.upload("r.bin", b"short", offset=6)


def test_a_resume_onto_a_different_file_is_data_loss(sb):
    sb.upload("d.bin", b"A" * 100)
    with pytest.raises(corral.CorralError) as caught:
        sb.upload("d.bin", b"B" * 200, offset=100)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS
    assert sb.read_file("d.bin") == b"A" * 100 + b"B" * 100


def test_a_download_resumes_into_the_local_file(sb, tmp_path):
    sb.upload("big.bin", BIG)
    local = tmp_path / "part.bin"
    local.write_bytes(BIG[:2 * calls.PIECE])
    resumed = sb.download("big.bin", local, offset=2 * calls.PIECE)
    assert (resumed.size, resumed.moved) == (len(BIG), len(BIG) - 2 * calls.PIECE)
    assert local.read_bytes() == BIG
    with pytest.raises(corral.InvalidArgument,
                       match=r"^INVALID_ARGUMENT: offset: a resumed download continues"):
        sb.download("big.bin", io.BytesIO(), offset=5)
    local.write_bytes(b"xy")
    with pytest.raises(corral.InvalidArgument,
                       match=r"^INVALID_ARGUMENT: offset: 9 is beyond the end"):
        sb.download("big.bin", local, offset=9)


def test_holes_come_back_as_zeros_and_stay_holes_in_a_local_file(sb, tmp_path):
    sb.run(["sh", "-c", "cd /workspace && truncate -s 8M sparse && printf x >> sparse "
                        "&& truncate -s 9M sparse"])
    expected = bytes(8 << 20) + b"x" + bytes((1 << 20) - 1)
    local = tmp_path / "sparse"
    got = sb.download("sparse", local)
    assert (got.size, got.sha256) == (9 << 20, hashlib.sha256(expected).hexdigest())
    assert 1 <= got.moved <= 64 << 10  # the data block around the "x"; the holes not moved
    assert local.read_bytes() == expected
    assert os.stat(local).st_blocks * 512 < 1 << 20
    into = io.BytesIO()
    sb.download("sparse", into)
    assert into.getvalue() == expected


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_tar_archive_goes_in_and_comes_out(sb, tmp_path):
    sb.run(["mkdir", "-p", "/workspace/src"])
    made = sb.put_archive("src", _tar({"pkg/a.py": b"A = 1\n", "b.txt": BIG[:5000]}))
    assert (made.files, made.dirs, made.skipped) == (2, 0, 0)
    assert sb.read_file("src/pkg/a.py") == b"A = 1\n"
    archive = tmp_path / "src.tar"
    stat = sb.get_archive("src", archive)
    assert (stat.path, stat.kind) == ("src", "dir")
    with tarfile.open(archive) as tar:
        assert tar.extractfile("src/b.txt").read() == BIG[:5000]
        assert sorted(tar.getnames()) == ["src", "src/b.txt", "src/pkg", "src/pkg/a.py"]
    with pytest.raises(corral.InvalidArgument,
                       match=r"^INVALID_ARGUMENT: archive: must be bytes"):
        sb.put_archive("src", 42)


def test_the_watch_stream_reports_a_change_after_watching(sb):
    events = sb.watch_files()
    first = next(events)
    assert (first.kind, first.path) == ("watching", ".")
    sb.write_file("seen.txt", "x")
    changes = (e for e in events if e.path == "seen.txt")
    assert next(changes).kind == "created"
    events.close()


def test_the_async_client_moves_files_the_same_way(daemon, tmp_path):
    async def main():
        async with corral.AsyncClient(daemon.socket) as client:
            async with client.sandbox(memory="128M") as sb:
                sent = await client.upload(sb.id, "a.bin", BIG)
                local = tmp_path / "a.bin"
                got = await client.download(sb.id, "a.bin", local)
                archive = io.BytesIO()
                await client.put_archive(sb.id, "", _tar({"t.txt": b"tar"}))
                stat = await client.get_archive(sb.id, "t.txt", archive)
                watch = client.watch_files(sb.id)
                first = await anext(watch)
                await watch.aclose()
                return sent, got, local.read_bytes(), stat, archive.getvalue(), first

    sent, got, data, stat, archive, first = asyncio.run(main())
    assert sent == got == corral.Transfer(len(BIG), hashlib.sha256(BIG).hexdigest(), len(BIG))
    assert data == BIG
    assert (stat.kind, stat.size) == ("file", 3)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.extractfile("t.txt").read() == b"tar"
    assert first.kind == "watching"
