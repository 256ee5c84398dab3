"""AsyncDispatcher: runs the events of asynchronous invocations, from the store, in the
server's event loop: each event's attempts, its retries with backoff, and where it goes at
the end (an on-success / on-failure function, or the dead-letter list).

Delivery is at least once. An event is written to the store before the caller gets its 202,
and leaves the store (deleted, dead-lettered, or handed to a destination function, in one
transaction) only after the attempt that decided its fate. A platform killed during an
attempt runs that event again at its next start, as Lambda may run an event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hxb.config import AsyncSettings
from hxb.errors import ThrottledError
from hxb.models import FunctionRevision, InvocationRequest, InvocationResult, function_arn
from hxb.queue.destinations import AttemptOutcome, FunctionDestination, destination_record, parse_destination
from hxb.queue.events import AsyncEvent, Condition, DeadLetterNotFoundError, EventState, PendingEvent
from hxb.queue.policy import Retry, after_failure, is_expired
from hxb.queue.schedule import FunctionKey, Schedule
from hxb.router import Router
from hxb.store import Store

log = logging.getLogger(__name__)

InvokeFn = Callable[[FunctionRevision, InvocationRequest], Awaitable[InvocationResult]]

# An attempt that failed inside the platform (the store unreachable, a bug) is tried again
# this much later at the least; it is logged, and does not count as a retry.
_PLATFORM_FAILURE_DELAY_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncStatistics:
    """One function's asynchronous events since this platform started (counters), and now."""

    queued: int  # accepted (202), or handed over to it as a destination
    succeeded: int
    retried: int  # attempts that failed and were scheduled again
    throttled: int  # attempts refused by a concurrency limit (not retries: they wait)
    dead_lettered: int
    delivered_on_failure: int  # handed to the on-failure function
    dropped_for_age: int  # older than async.max_event_age: not run again
    running: int
    waiting: int


@dataclass
class _Counts:
    queued: int = 0
    succeeded: int = 0
    retried: int = 0
    throttled: int = 0
    dead_lettered: int = 0
    delivered_on_failure: int = 0
    dropped_for_age: int = 0


class AsyncDispatcher:
    def __init__(
        self,
        settings: AsyncSettings,
        *,
        store: Store,
        router: Router,
        invoke: InvokeFn,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`invoke` runs one invocation through admission (`Invoker.invoke`): it raises
        ThrottledError when a concurrency limit is reached. `clock` is wall-clock seconds:
        event ages and due times are stored and outlive the process."""
        self._settings = settings
        self._store = store
        self._router = router
        self._invoke = invoke
        self._clock = clock
        self._schedule = Schedule(settings.max_in_flight_per_function)
        self._counts: dict[FunctionKey, _Counts] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _count(self, workspace: str, function: str) -> _Counts:
        return self._counts.setdefault((workspace, function), _Counts())

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Schedules every event the store holds as pending (left by the last run, including
        those that were running when it stopped), then starts dispatching."""
        if self._task is not None:
            return
        for pending in await self._store.list_pending_async_events():
            self._schedule.add(pending)
        if len(self._schedule):
            log.info("async events waiting from the last run", extra={"count": len(self._schedule)})
        self._task = asyncio.get_running_loop().create_task(self._dispatch_forever(), name="hxb-async-dispatcher")
        self._task.add_done_callback(_log_unexpected_end)

    async def stop(self) -> None:
        """Starts no more attempts; lets running ones finish for `shutdown_grace_s`, then
        cancels them (their events stay pending and run again at the next start)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(self._settings.shutdown_grace_s):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _dispatch_forever(self) -> None:
        # Wakes on an enqueue, a redrive or a finished attempt (`_wake`), or when the earliest
        # due retry or end of a throttle comes: the store is never polled.
        async with asyncio.TaskGroup() as attempts:
            while not self._closing:
                for pending in self._schedule.take_due(self._now_ms()):
                    attempts.create_task(self._attempt(pending), name=f"hxb-async-{pending.function}")
                self._wake.clear()
                due_ms = self._schedule.next_due_ms()
                timeout_s = None if due_ms is None else max(0.0, (due_ms - self._now_ms()) / 1000)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout_s):
                        await self._wake.wait()

    # --- accepting events -----------------------------------------------------------------------

    async def enqueue(
        self,
        revision: FunctionRevision,
        *,
        event_id: str,
        payload: bytes,
        invoked_arn: str,
        client_context: Mapping[str, Any] | None = None,
    ) -> AsyncEvent:
        """Stores the event durably, then schedules it. Once this returns the event survives
        a crash: the caller may answer 202."""
        now_ms = self._now_ms()
        event = AsyncEvent(
            id=event_id,
            workspace=revision.workspace,
            function=revision.name,
            invoked_arn=invoked_arn,
            payload=payload,
            client_context=client_context,
            enqueued_at_ms=now_ms,
            due_at_ms=now_ms,
        )
        await self._store.enqueue_async_event(event)
        self._accepted(event)
        return event

    def _accepted(self, event: AsyncEvent) -> None:
        self._schedule.add(PendingEvent(event.id, event.workspace, event.function, event.due_at_ms))
        self._count(event.workspace, event.function).queued += 1
        self._wake.set()

    # --- one attempt ----------------------------------------------------------------------------

    async def _attempt(self, pending: PendingEvent) -> None:
        try:
            await self._run_attempt(pending)
        except Exception:  # a boundary: one event failing inside the platform must not stop the rest
            log.exception("async event attempt failed", extra={"event_id": pending.id, "function": pending.function})
            self._schedule.reschedule(pending, self._now_ms() + int(_PLATFORM_FAILURE_DELAY_S * 1000))
        finally:
            self._wake.set()  # a place is free, or a due time changed

    async def _run_attempt(self, pending: PendingEvent) -> None:
        event = await self._store.get_async_event(pending.id)
        if event is None or event.state is not EventState.PENDING:
            self._schedule.finished(pending)  # deleted with its function, or dead-lettered meanwhile
            return
        revision = self._router.get(event.workspace, event.function)
        if revision is None:
            # Not served now (its function failed to load, or is being deleted): the event
            # stays in the store, and is scheduled again at the next start.
            log.warning("async event of a function that is not loaded", extra={"event_id": event.id})
            self._schedule.finished(pending)
            return
        cfg = revision.config.async_
        if is_expired(event.enqueued_at_ms, self._now_ms(), cfg.max_event_age):
            last = None
            if event.attempts and event.error_payload is not None:
                last = AttemptOutcome(
                    executed_version=revision.version, payload=event.error_payload, function_error=True
                )
            await self._leave(pending, event, revision, Condition.EVENT_AGE_EXCEEDED, last, event.attempts)
            return
        request = InvocationRequest(
            invocation_id=event.id,
            payload=event.payload,
            invoked_arn=event.invoked_arn,
            client_context=event.client_context,
        )
        try:
            result = await self._invoke(revision, request)
        except ThrottledError:
            self._count(event.workspace, event.function).throttled += 1
            self._schedule.throttled(pending, self._now_ms() + int(self._settings.throttle_delay_s * 1000))
            return
        attempts = event.attempts + 1
        outcome = AttemptOutcome(
            executed_version=result.executed_version, payload=result.payload, function_error=result.function_error
        )
        if not result.function_error:
            await self._leave(pending, event, revision, Condition.SUCCESS, outcome, attempts)
            return
        decision = after_failure(
            failed_attempts=attempts,
            max_retries=cfg.max_retries,
            enqueued_at_ms=event.enqueued_at_ms,
            now_ms=self._now_ms(),
            max_event_age_s=cfg.max_event_age,
            base_s=self._settings.retry_base_s,
        )
        if isinstance(decision, Retry):
            still_pending = await self._store.retry_async_event(
                event.id,
                attempts=attempts,
                due_at_ms=decision.due_at_ms,
                error_type=_error_type(result),
                error_payload=result.payload,
            )
            if still_pending:
                self._count(event.workspace, event.function).retried += 1
                self._schedule.reschedule(pending, decision.due_at_ms)
            else:
                self._schedule.finished(pending)
            return
        failed = dataclasses.replace(event, error_type=_error_type(result), error_payload=result.payload)
        await self._leave(pending, failed, revision, decision.condition, outcome, attempts)

    async def _leave(
        self,
        pending: PendingEvent,
        event: AsyncEvent,
        revision: FunctionRevision,
        condition: Condition,
        outcome: AttemptOutcome | None,
        attempts: int,
    ) -> None:
        """The event leaves the queue: to its destination function, or done (success), or to
        the dead-letter list (failure without a function to go to: nothing is lost)."""
        success = condition is Condition.SUCCESS
        counts = self._count(event.workspace, event.function)
        handover = self._destination_event(event, revision, condition, outcome, attempts)
        if handover is not None or success:
            left = await self._store.finish_async_event(event.id, then=handover)
            if left and handover is not None:
                self._accepted(handover)
                if not success:
                    counts.delivered_on_failure += 1
            if left and success:
                counts.succeeded += 1
        else:
            left = await self._store.dead_letter_async_event(
                event.id,
                attempts=attempts,
                reason=condition,
                error_type=event.error_type,
                error_payload=event.error_payload,
                at_ms=self._now_ms(),
            )
            if left:
                counts.dead_lettered += 1
                log.info(
                    "async event dead-lettered",
                    extra={"event_id": event.id, "function": event.function, "condition": condition.value},
                )
        if left and condition is Condition.EVENT_AGE_EXCEEDED:
            counts.dropped_for_age += 1
        self._schedule.finished(pending)

    def _destination_event(
        self,
        event: AsyncEvent,
        revision: FunctionRevision,
        condition: Condition,
        outcome: AttemptOutcome | None,
        attempts: int,
    ) -> AsyncEvent | None:
        """The event for the on-success / on-failure function, if one is configured and
        deployed; None otherwise (a failure then goes to the dead-letter list)."""
        cfg = revision.config.async_
        destination = parse_destination(cfg.on_success if condition is Condition.SUCCESS else cfg.on_failure)
        if not isinstance(destination, FunctionDestination):
            return None
        if destination.name == revision.name:
            # A function as its own destination would feed itself forever.
            log.warning("a function is its own async destination: not delivered", extra={"function": revision.name})
            return None
        target = self._router.get(revision.workspace, destination.name)
        if target is None:
            log.warning(
                "async destination function not found",
                extra={"function": revision.name, "destination": destination.name, "event_id": event.id},
            )
            return None
        now_ms = self._now_ms()
        record = destination_record(
            event,
            function_arn=f"{revision.arn}:{revision.version}",
            condition=condition,
            invoke_count=attempts,
            outcome=outcome,
            now_ms=now_ms,
        )
        return AsyncEvent(
            id=str(uuid.uuid4()),
            workspace=target.workspace,
            function=target.name,
            invoked_arn=function_arn(target.region, target.workspace, target.name),
            payload=json.dumps(record, separators=(",", ":")).encode(),
            client_context=None,
            enqueued_at_ms=now_ms,
            due_at_ms=now_ms,
        )

    # --- management -----------------------------------------------------------------------------

    def statistics(self, workspace: str, function: str) -> AsyncStatistics:
        counts = self._counts.get((workspace, function), _Counts())
        return AsyncStatistics(
            queued=counts.queued,
            succeeded=counts.succeeded,
            retried=counts.retried,
            throttled=counts.throttled,
            dead_lettered=counts.dead_lettered,
            delivered_on_failure=counts.delivered_on_failure,
            dropped_for_age=counts.dropped_for_age,
            running=self._schedule.running(workspace, function),
            waiting=self._schedule.waiting(workspace, function),
        )

    async def stored_counts(self, workspace: str, function: str) -> dict[EventState, int]:
        return await self._store.count_async_events(workspace, function)

    async def dead_letters(self, workspace: str, function: str, *, limit: int = 100) -> list[AsyncEvent]:
        return await self._store.list_dead_letters(workspace, function, limit=limit)

    async def dead_letter(self, workspace: str, function: str, event_id: str) -> AsyncEvent:
        event = await self._store.get_async_event(event_id)
        if (
            event is None
            or event.state is not EventState.DEAD
            or (event.workspace, event.function)
            != (
                workspace,
                function,
            )
        ):
            raise DeadLetterNotFoundError(function, event_id)
        return event

    async def redrive(self, workspace: str, function: str, event_ids: Sequence[str] | None = None) -> list[str]:
        """Queues dead letters again (all of the function's, or those named) as new events:
        attempts and age start over. Returns the ids queued; an id that is not a dead letter
        of the function is an error, and then nothing is queued."""
        if event_ids is not None:
            for event_id in event_ids:
                await self.dead_letter(workspace, function, event_id)
        redriven = await self._store.redrive_dead_letters(workspace, function, event_ids, now_ms=self._now_ms())
        for pending in redriven:
            self._schedule.add(pending)
        if redriven:
            self._count(workspace, function).queued += len(redriven)
            self._wake.set()
        return [p.id for p in redriven]

    async def drop_function(self, workspace: str, function: str) -> int:
        """The function was deleted: its waiting events and dead letters go with it."""
        self._schedule.forget_function(workspace, function)
        self._counts.pop((workspace, function), None)
        return await self._store.delete_async_events(workspace, function)


def _error_type(result: InvocationResult) -> str | None:
    """The failed attempt's error type: the platform's (a timeout, a crash), else the one in the
    function's error document (`errorType`, e.g. ValueError)."""
    if result.error_type:
        return result.error_type
    try:
        document = json.loads(result.payload)
    except (ValueError, RecursionError):
        return None
    error_type = document.get("errorType") if isinstance(document, dict) else None
    return error_type[:200] if isinstance(error_type, str) else None


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the async event dispatcher stopped", exc_info=task.exception())
