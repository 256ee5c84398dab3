"""LogSink: takes log events from the invoke path without blocking it and writes them to the
store in batches, from a background task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hxb.logs.records import LogEvent, now_ms

log = logging.getLogger(__name__)

WriteBatch = Callable[[Sequence[LogEvent]], Awaitable[None]]


class LogFlow(Protocol):
    """What a reader of instance output asks the sink: should it pause, and when to resume."""

    def over_quota(self, stream: str) -> bool: ...
    def when_flushed(self, callback: Callable[[], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class LogSinkStatistics:
    pending_events: int
    pending_bytes: int
    written_events: int
    dropped_events: int


class LogSink:
    """Buffers events in memory and flushes them every `flush_interval_s` (sooner once a lot is
    waiting), in chunks so that the event loop keeps serving requests meanwhile.

    Memory stays bounded two ways. Each stream (one instance) may have `stream_quota_bytes`
    waiting; beyond that `over_quota(stream)` is true and its worker stops reading the
    instance's output until a flush makes room (the writer blocks, as on a slow terminal),
    so one chatty function cannot crowd out the others. Past `max_pending_bytes` in all, new
    events are dropped and counted, and a line saying how many were lost takes their place."""

    def __init__(
        self,
        write: WriteBatch,
        *,
        flush_interval_s: float,
        max_pending_bytes: int,
        stream_quota_bytes: int | None = None,
        chunk_events: int = 2000,
    ) -> None:
        self._write = write
        self._flush_interval_s = flush_interval_s
        self._max_pending_bytes = max_pending_bytes
        self._stream_quota_bytes = stream_quota_bytes or max(max_pending_bytes // 16, 64 * 1024)
        self._chunk_events = chunk_events
        self._pending: list[LogEvent] = []
        self._pending_bytes = 0
        self._stream_bytes: dict[str, int] = {}
        self._written = 0
        self._dropped = 0
        self._dropped_since_flush: dict[tuple[str, str, str], int] = {}
        self._listeners: list[Callable[[], None]] = []
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    @staticmethod
    def _size(event: LogEvent) -> int:
        return len(event.message) + 64

    def emit(self, event: LogEvent) -> None:
        size = self._size(event)
        if self._pending_bytes + size > self._max_pending_bytes:
            self._dropped += 1
            key = (event.workspace, event.function, event.stream)
            self._dropped_since_flush[key] = self._dropped_since_flush.get(key, 0) + 1
            return
        self._pending.append(event)
        self._pending_bytes += size
        self._stream_bytes[event.stream] = self._stream_bytes.get(event.stream, 0) + size
        if self._pending_bytes > self._max_pending_bytes // 8 or len(self._pending) > self._chunk_events:
            self._wakeup.set()

    def over_quota(self, stream: str) -> bool:
        return self._stream_bytes.get(stream, 0) > self._stream_quota_bytes

    def when_flushed(self, callback: Callable[[], None]) -> None:
        """Calls `callback` once, after the next flush (a paused reader resumes from it)."""
        self._listeners.append(callback)
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hxb-log-sink")

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:  # a boundary: the sink must outlive a failing store
                log.exception("writing logs to the store failed; will retry")

    def _add_dropped_markers(self) -> None:
        stamp = now_ms()
        for (workspace, function, stream), count in self._dropped_since_flush.items():
            self.emit_marker(
                LogEvent(
                    workspace,
                    function,
                    stream,
                    None,
                    stamp,
                    f"[hxb] {count} log lines dropped: the log store fell behind",
                )
            )
        self._dropped_since_flush.clear()

    def emit_marker(self, event: LogEvent) -> None:
        # Markers are few and small: they bypass the cap so that a loss is always reported.
        self._pending.append(event)
        self._pending_bytes += self._size(event)
        self._stream_bytes[event.stream] = self._stream_bytes.get(event.stream, 0) + self._size(event)

    async def flush(self) -> None:
        async with self._flush_lock:
            if self._dropped_since_flush:
                self._add_dropped_markers()
            while self._pending:
                chunk = self._pending[: self._chunk_events]
                await self._write(chunk)
                # Only now: a failed write leaves the chunk pending, so nothing is lost.
                del self._pending[: len(chunk)]
                for event in chunk:
                    size = self._size(event)
                    self._pending_bytes -= size
                    left = self._stream_bytes[event.stream] - size
                    if left > 0:
                        self._stream_bytes[event.stream] = left
                    else:
                        del self._stream_bytes[event.stream]
                self._written += len(chunk)
                self._notify()
                await asyncio.sleep(0)  # let requests through between chunks
            self._notify()

    def _notify(self) -> None:
        listeners, self._listeners = self._listeners, []
        for callback in listeners:
            callback()

    async def close(self) -> None:
        # Not cancelled: a write cancelled midway leaves its connection holding the database's
        # write lock, and the last flush below would then find it locked.
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()

    def statistics(self) -> LogSinkStatistics:
        return LogSinkStatistics(
            pending_events=len(self._pending),
            pending_bytes=self._pending_bytes,
            written_events=self._written,
            dropped_events=self._dropped,
        )
