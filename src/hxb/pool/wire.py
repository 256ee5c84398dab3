"""The private channel between the pool and a built-in runtime's bootstrap: framing only.

Mirrors `hxb/bootstraps/python/_hxb_bootstrap.py` (which cannot import hxb). A frame is a
9-byte header `<BII` (type, meta length, body length), the meta, then the body. Sizes are
checked before anything is buffered: a guest that announces a 4 GB frame is cut off at once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from hxb.errors import ResponseTooLargeError, RuntimeProtocolError

HEADER: Final = struct.Struct("<BII")
MAX_META_BYTES: Final = 64 * 1024
# An error document carries a message and a stack trace; more than this is not one.
MAX_ERROR_BYTES: Final = 1024 * 1024
# An instance serving several invocations at once (concurrency_per_instance > 1) writes each
# line of an invocation as `LOG_TAG + invocation id + LOG_TAG + text`; untagged lines are the
# instance's own.
LOG_TAG: Final = "\x1f"


class FrameType(IntEnum):
    INVOKE = 1
    READY = 10
    INIT_ERROR = 11
    RESULT = 12
    ERROR = 13


_FROM_RUNTIME: Final = frozenset({FrameType.READY, FrameType.INIT_ERROR, FrameType.RESULT, FrameType.ERROR})


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    meta: bytes
    body: bytes


def encode_frame(frame_type: FrameType, meta: bytes, body: bytes) -> bytes:
    return HEADER.pack(frame_type, len(meta), len(body)) + meta + body


class FrameDecoder:
    """Incremental decoder for frames sent by a runtime."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._need: tuple[FrameType, int, int] | None = None

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    return frames
                raw_type, meta_len, body_len = HEADER.unpack_from(self._buf)
                self._need = (self._check(raw_type, meta_len, body_len), meta_len, body_len)
                del self._buf[: HEADER.size]
            frame_type, meta_len, body_len = self._need
            if len(self._buf) < meta_len + body_len:
                return frames
            meta = bytes(self._buf[:meta_len])
            body = bytes(self._buf[meta_len : meta_len + body_len])
            del self._buf[: meta_len + body_len]
            self._need = None
            frames.append(Frame(frame_type, meta, body))

    def _check(self, raw_type: int, meta_len: int, body_len: int) -> FrameType:
        try:
            frame_type = FrameType(raw_type)
        except ValueError:
            raise RuntimeProtocolError(f"the runtime sent an unknown frame type {raw_type}") from None
        if frame_type not in _FROM_RUNTIME:
            raise RuntimeProtocolError(f"the runtime sent a {frame_type.name} frame, which only the platform sends")
        if meta_len > MAX_META_BYTES:
            raise RuntimeProtocolError(f"the runtime sent {meta_len} bytes of frame metadata (limit {MAX_META_BYTES})")
        # Every frame type has a cap, checked before a byte of it is buffered.
        if frame_type == FrameType.READY and (meta_len or body_len):
            raise RuntimeProtocolError(
                f"the runtime sent a READY frame with {meta_len + body_len} bytes (expected none)"
            )
        if frame_type == FrameType.RESULT and body_len > self._max_body_bytes:
            raise ResponseTooLargeError(body_len, self._max_body_bytes)
        if frame_type in (FrameType.ERROR, FrameType.INIT_ERROR) and body_len > MAX_ERROR_BYTES:
            raise RuntimeProtocolError(f"the runtime sent a {body_len}-byte error document (limit {MAX_ERROR_BYTES})")
        return frame_type
