"""Turning an instance's output pipe into log lines, and collecting one invocation's log."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hxb.logs.records import TAIL_BYTES, LogEvent, now_ms


class LineSplitter:
    """Splits a byte stream into lines. A runtime sends a multi-line record (a traceback)
    with CR in place of its inner newlines so that it stays one event; CR becomes LF again
    here. Lines longer than `max_line_bytes` are cut into several events. With `tag` (the
    output of an instance serving several invocations at once), a cut line's invocation tag
    (`tag + id + tag` at its start) is repeated on every piece, so each still finds its
    invocation."""

    def __init__(self, max_line_bytes: int, *, tag: str | None = None) -> None:
        self._max = max_line_bytes
        self._partial = b""
        self._tag = tag.encode() if tag is not None else None

    def feed(self, data: bytes) -> list[str]:
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        lines = [self._decode(raw) for chunk in complete for raw in self._cut(chunk)]
        while len(self._partial) > self._max:
            piece, self._partial = self._split(self._partial)
            lines.append(self._decode(piece))
        return lines

    def flush(self) -> list[str]:
        """Whatever is left without a newline, as a line of its own (end of an invocation)."""
        if not self._partial:
            return []
        rest, self._partial = self._partial, b""
        return [self._decode(raw) for raw in self._cut(rest)]

    def _cut(self, chunk: bytes) -> list[bytes]:
        pieces = []
        while len(chunk) > self._max:
            piece, chunk = self._split(chunk)
            pieces.append(piece)
        pieces.append(chunk)
        return pieces

    def _split(self, chunk: bytes) -> tuple[bytes, bytes]:
        """The first `max_line_bytes` of an overlong line, and the rest (tagged like it)."""
        piece, rest = chunk[: self._max], chunk[self._max :]
        if self._tag is not None and chunk.startswith(self._tag):
            end = chunk.find(self._tag, len(self._tag))
            # A tag that takes half the line or more is not repeated: the cut must make progress.
            if 0 < end < self._max // 2:
                rest = chunk[: end + len(self._tag)] + rest
        return piece, rest

    @staticmethod
    def _decode(raw: bytes) -> str:
        return raw.decode("utf-8", errors="replace").replace("\r", "\n")


class InvocationLog:
    """The log of one invocation: forwards its events to the sink as they come (so a function
    that prints 10 MB is not held in memory) and keeps the last 4 KB for `X-Amz-Log-Result`."""

    __slots__ = ("_emit", "_function", "_invocation_id", "_stream", "_tail", "_tail_bytes", "_workspace")

    def __init__(
        self,
        emit: Callable[[LogEvent], None],
        *,
        workspace: str,
        function: str,
        stream: str,
        invocation_id: str,
    ) -> None:
        self._emit = emit
        self._workspace = workspace
        self._function = function
        self._stream = stream
        self._invocation_id = invocation_id
        self._tail: deque[str] = deque()
        self._tail_bytes = 0

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    def add(self, message: str, ts_ms: int | None = None) -> None:
        self._emit(
            LogEvent(
                self._workspace,
                self._function,
                self._stream,
                self._invocation_id,
                now_ms() if ts_ms is None else ts_ms,
                message,
            )
        )
        self._tail.append(message)
        self._tail_bytes += len(message) + 1
        # Drop old lines only while what stays still holds 4 KB (characters never outnumber
        # bytes): the exact cut is made in bytes at the end.
        while len(self._tail) > 1 and self._tail_bytes - (len(self._tail[0]) + 1) >= TAIL_BYTES:
            self._tail_bytes -= len(self._tail.popleft()) + 1

    def tail_lines(self) -> list[str]:
        return list(self._tail)
