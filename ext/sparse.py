"""The data ranges of a sparse file (SEEK_DATA/SEEK_HOLE): the one walk over its holes.

Standard library only and free of every other Corral layer, so that both sides of a copy
use it: sandbox/fstree.py (copying and streaming a sandbox's files) and runtime/client.py
(uploading a local file), which may import neither the sandbox layer nor the daemon's.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator


def data_ranges(fd: int, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, stop) of the data of a file from offset to end (its size), skipping holes.

    A filesystem that cannot tell holes (EINVAL from SEEK_DATA) has one range: all of it.
    """
    if end is None:
        end = os.fstat(fd).st_size
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos on
                return
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here: all of it is data
                yield pos, end
                return
            raise
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            hole = end
        stop = min(hole, end)
        if stop <= data:
            return
        yield data, stop
        pos = stop
