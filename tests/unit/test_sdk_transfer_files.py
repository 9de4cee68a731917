"""The local side of the SDK's file transfers (corral.calls): which files a transfer opens,
and that it closes those on every path (a failed __enter__ included) while a file object
of the caller's stays open. No daemon: nothing here sends a request."""

import errno
import hashlib
import io
import os
import re

import pytest

from corral import calls
from corral.errors import InvalidArgument


def test_an_upload_hashes_the_prefix_and_leaves_the_callers_file_open():
    mine = io.BytesIO(b"abcdef")
    with calls.Upload("sb", "/workspace/x", mine, 0, 2) as upload:
        assert upload.digest.digest() == hashlib.sha256(b"ab").digest()
        assert mine.tell() == 2
    assert not mine.closed


def test_an_archive_from_bytes_is_closed_after_the_call():
    with calls.PutArchive("sb", "/workspace", b"tar bytes") as put:
        assert put.file.read() == b"tar bytes"
    assert put.file.closed


@pytest.mark.parametrize("transfer", [
    lambda dest: calls.Download("sb", "/workspace/x", dest, 0, 0),
    lambda dest: calls.GetArchive("sb", "/workspace", dest),
])
def test_a_download_to_a_path_it_cannot_write_names_the_path(transfer, tmp_path):
    where = tmp_path / "no such dir" / "out"
    with pytest.raises(InvalidArgument,
                       match=rf"^INVALID_ARGUMENT: dest: cannot write '{re.escape(str(where))}': "
                             r"No such file or directory$"):
        with transfer(str(where)):
            pass


@pytest.mark.parametrize("transfer", [
    lambda dest: calls.Download("sb", "/workspace/x", dest, 0, 0),
    lambda dest: calls.GetArchive("sb", "/workspace", dest),
])
def test_a_download_closes_the_file_it_opened_and_not_the_callers(transfer, tmp_path):
    with transfer(str(tmp_path / "out")) as opened:
        assert opened.dest.name == str(tmp_path / "out")
    assert opened.dest.closed
    mine = io.BytesIO()
    with transfer(mine) as given:
        assert given.dest is mine
    assert not mine.closed


@pytest.mark.parametrize(("transfer", "beyond"), [
    (lambda local: calls.Upload("sb", "/workspace/x", local, 0, 9), "source"),
    (lambda local: calls.Download("sb", "/workspace/x", local, 9, 0), "'{local}'"),
])
def test_a_resume_past_the_end_of_the_local_file_closes_it(transfer, beyond, tmp_path):
    local = tmp_path / "part"
    local.write_bytes(b"1234")
    where = re.escape(beyond.format(local=local))
    with pytest.raises(InvalidArgument, match=rf"^INVALID_ARGUMENT: offset: 9 is beyond the "
                                              rf"end of {where} \(4 bytes\)$") as failed:
        with transfer(str(local)):
            pass
    # closed, not merely collected: the traceback still holds the frame that opened it
    assert failed.traceback and str(local) not in _open_paths()


def _open_paths() -> set[str]:
    """What this process's descriptors point at."""
    fds = "/proc/self/fd"
    paths = set()
    for fd in os.listdir(fds):
        try:
            paths.add(os.readlink(f"{fds}/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    return paths


def test_a_resume_whose_local_file_cannot_be_truncated_closes_it():
    # /dev/zero reads as long as asked, then refuses ftruncate with EINVAL: the failure
    # after the file was opened and hashed must not leave the descriptor open.
    with pytest.raises(OSError) as failed:
        with calls.Download("sb", "/workspace/x", "/dev/zero", 9, 0):
            pass
    assert failed.value.errno == errno.EINVAL
    assert "/dev/zero" not in _open_paths()
