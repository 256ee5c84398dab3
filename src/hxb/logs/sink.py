"""LogSink: takes log events from the invoke path without blocking it and writes them to the
store in batches, from a background task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from hxb.logs.records import LogEvent, now_ms

log = logging.getLogger(__name__)

WriteBatch = Callable[[Sequence[LogEvent]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LogSinkStatistics:
    pending_events: int
    pending_bytes: int
    written_events: int
    dropped_events: int


class LogSink:
    """Buffers events in memory and flushes them every `flush_interval_s`. When the store
    falls behind by more than `max_pending_bytes`, new events are dropped and counted, and a
    line saying how many were lost is written in their place: memory stays bounded."""

    def __init__(self, write: WriteBatch, *, flush_interval_s: float, max_pending_bytes: int) -> None:
        self._write = write
        self._flush_interval_s = flush_interval_s
        self._max_pending_bytes = max_pending_bytes
        self._pending: list[LogEvent] = []
        self._pending_bytes = 0
        self._written = 0
        self._dropped = 0
        self._dropped_since_flush: dict[tuple[str, str, str], int] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    def emit(self, event: LogEvent) -> None:
        size = len(event.message) + 64
        if self._pending_bytes + size > self._max_pending_bytes:
            self._dropped += 1
            key = (event.workspace, event.function, event.stream)
            self._dropped_since_flush[key] = self._dropped_since_flush.get(key, 0) + 1
            return
        self._pending.append(event)
        self._pending_bytes += size

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hxb-log-sink")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:  # a boundary: the sink must outlive a failing store
                log.exception("writing logs to the store failed; will retry")

    async def flush(self) -> None:
        async with self._flush_lock:
            if self._dropped_since_flush:
                stamp = now_ms()
                for (workspace, function, stream), count in self._dropped_since_flush.items():
                    self._pending.append(
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
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            try:
                await self._write(batch)
            except BaseException:
                # Put the batch back in front so nothing is lost on a transient failure.
                self._pending[:0] = batch
                raise
            self._pending_bytes = sum(len(e.message) + 64 for e in self._pending)
            self._written += len(batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
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
