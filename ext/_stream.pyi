# Type stub of the compiled token stream core (ext/_stream.pyx). The pure-Python twin
# corral.ext._stream_py has the same API and defines the shared types re-exported here.
from typing import Final, Literal

from corral.ext._stream_py import BATCH_OVERHEAD as BATCH_OVERHEAD
from corral.ext._stream_py import DEFAULT_LOG_BYTES as DEFAULT_LOG_BYTES
from corral.ext._stream_py import DEFAULT_MAX_FRAME_BYTES as DEFAULT_MAX_FRAME_BYTES
from corral.ext._stream_py import DEFAULT_TAKE_BYTES as DEFAULT_TAKE_BYTES
from corral.ext._stream_py import ENTRY_OVERHEAD as ENTRY_OVERHEAD
from corral.ext._stream_py import HEADER_SIZE as HEADER_SIZE
from corral.ext._stream_py import MAX_FIRST_SEQ as MAX_FIRST_SEQ
from corral.ext._stream_py import MAX_FRAME_BYTES_LIMIT as MAX_FRAME_BYTES_LIMIT
from corral.ext._stream_py import MAX_LOG_BYTES_LIMIT as MAX_LOG_BYTES_LIMIT
from corral.ext._stream_py import MODES as MODES
from corral.ext._stream_py import CursorStatistics as CursorStatistics
from corral.ext._stream_py import ErrorCode as ErrorCode
from corral.ext._stream_py import EventKind as EventKind
from corral.ext._stream_py import FrameType as FrameType
from corral.ext._stream_py import SeqEvictedError as SeqEvictedError
from corral.ext._stream_py import StreamClosedError as StreamClosedError
from corral.ext._stream_py import StreamEvent as StreamEvent
from corral.ext._stream_py import StreamStatistics as StreamStatistics

IMPLEMENTATION: Final = "cython"

def encode_frame(frame_type: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One protocol v1 frame: u32 LE payload length, u8 type, payload."""

class Cursor:
    """A subscriber's position in one stream; pass it to `TokenStream.take()`."""

    @property
    def next_seq(self) -> int:
        """The seq this cursor's next batch starts at, unless it fell behind."""
    def statistics(self) -> CursorStatistics: ...

class TokenStream:
    """One agent output stream: decoder, bounded replay log and subscriber cursors."""

    def __init__(
        self,
        mode: Literal["frames", "text", "bytes"] = "frames",
        *,
        log_bytes: int = ...,
        max_frame_bytes: int = ...,
        first_seq: int = ...,
    ) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Decode more of the stream; returns how many log entries it appended."""
    def close(self) -> int:
        """End of input: flush a partial code point, or report a partial frame."""
    def append_event(self, kind: int, payload: bytes = b"") -> int:
        """Append a runtime-made event; returns its seq."""
    def pending_input(self) -> bytes:
        """The bytes fed that are not part of an entry yet (a cut frame or code point)."""
    def next_event(self) -> StreamEvent | None:
        """The oldest non-token entry not pulled yet (errors included), or None."""
    @property
    def first_seq(self) -> int: ...
    @property
    def next_seq(self) -> int: ...
    @property
    def failed(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    def get(self, seq: int) -> StreamEvent:
        """The log entry with this seq, tokens included (slow path)."""
    def subscribe(self, from_seq: int | None = None) -> Cursor: ...
    def unsubscribe(self, cursor: Cursor) -> None: ...
    def take(self, cursor: Cursor, max_bytes: int = ...) -> bytes | None:
        """The next encoded corral.v1.StreamBatch for this cursor, or None when caught up."""
    def statistics(self) -> StreamStatistics: ...
