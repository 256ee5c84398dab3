"""Schedule: which waiting events may start now. In memory and synchronous (no clock, no
store), so its rules are unit-tested directly: events of a function start in due order, at
most `max_in_flight` of a function at once, none of a function while it is throttled, and an
event is never handed out twice at the same time."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from hxb.errors import InternalError
from hxb.queue.events import PendingEvent

FunctionKey = tuple[str, str]  # (workspace, function)


@dataclass
class _FunctionQueue:
    # (due_at_ms, sequence, event): the sequence keeps equal due times in arrival order.
    heap: list[tuple[int, int, PendingEvent]] = field(default_factory=list)
    running: int = 0
    paused_until_ms: int = 0


class Schedule:
    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight} must be >= 1")
        self._max_in_flight = max_in_flight
        self._queues: dict[FunctionKey, _FunctionQueue] = {}
        self._known: set[str] = set()  # every id waiting or running: added at most once
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._known)

    def add(self, event: PendingEvent) -> bool:
        """Schedules a waiting event; False if it is already waiting or running."""
        if event.id in self._known:
            return False
        self._known.add(event.id)
        self._push(event)
        return True

    def _push(self, event: PendingEvent) -> None:
        queue = self._queues.setdefault((event.workspace, event.function), _FunctionQueue())
        heapq.heappush(queue.heap, (event.due_at_ms, next(self._sequence), event))

    def take_due(self, now_ms: int) -> list[PendingEvent]:
        """The events that start now; each stays running until `finished` or `reschedule`."""
        taken: list[PendingEvent] = []
        for queue in self._queues.values():
            if queue.paused_until_ms > now_ms:
                continue
            while queue.heap and queue.running < self._max_in_flight and queue.heap[0][0] <= now_ms:
                taken.append(heapq.heappop(queue.heap)[2])
                queue.running += 1
        return taken

    def next_due_ms(self) -> int | None:
        """When `take_due` may next return something without any other call in between: the
        earliest due (or end of pause) of a function that has room. None: only an `add`,
        `finished` or `reschedule` can change that."""
        times = [
            max(queue.heap[0][0], queue.paused_until_ms)
            for queue in self._queues.values()
            if queue.heap and queue.running < self._max_in_flight
        ]
        return min(times, default=None)

    def finished(self, event: PendingEvent) -> None:
        """The running event left the queue (succeeded, dead-lettered, delivered or dropped)."""
        self._stop_running(event)
        self._known.discard(event.id)
        queue = self._queues.get((event.workspace, event.function))
        if queue is not None and not queue.heap and not queue.running:
            del self._queues[(event.workspace, event.function)]

    def reschedule(self, event: PendingEvent, due_at_ms: int) -> PendingEvent:
        """The running event waits again, until `due_at_ms` (a retry)."""
        self._stop_running(event)
        again = PendingEvent(event.id, event.workspace, event.function, due_at_ms)
        self._push(again)
        return again

    def throttled(self, event: PendingEvent, until_ms: int) -> None:
        """The running event was refused by a concurrency limit: it waits, keeping its place,
        and no event of its function starts before `until_ms` (they would be refused too)."""
        self._stop_running(event)
        self._push(event)
        queue = self._queues[(event.workspace, event.function)]
        queue.paused_until_ms = max(queue.paused_until_ms, until_ms)

    def forget_function(self, workspace: str, function: str) -> None:
        """Drops the function's waiting events (deleted with it). Running ones finish normally."""
        queue = self._queues.get((workspace, function))
        if queue is None:
            return
        for _, _, event in queue.heap:
            self._known.discard(event.id)
        queue.heap.clear()
        if not queue.running:
            del self._queues[(workspace, function)]

    def running(self, workspace: str, function: str) -> int:
        queue = self._queues.get((workspace, function))
        return queue.running if queue is not None else 0

    def waiting(self, workspace: str, function: str) -> int:
        queue = self._queues.get((workspace, function))
        return len(queue.heap) if queue is not None else 0

    def _stop_running(self, event: PendingEvent) -> None:
        queue = self._queues.get((event.workspace, event.function))
        if queue is None or queue.running < 1 or event.id not in self._known:
            raise InternalError(f"event {event.id} of {event.function!r} is not running")
        queue.running -= 1
