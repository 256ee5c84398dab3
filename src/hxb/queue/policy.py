"""What happens to an event after an attempt: retry later, or leave the queue. Pure functions
of numbers, so that the rules are unit-tested without a clock or a store."""

from __future__ import annotations

from dataclasses import dataclass

from hxb.queue.events import Condition


def retry_delay_s(failed_attempts: int, base_s: float) -> float:
    """Delay before the next attempt once `failed_attempts` (>= 1) have failed: base, 2 x base,
    4 x base... (Lambda waits 1 min, then 2 min; `base_s` is HXB_ASYNC_RETRY_BASE_S)."""
    if failed_attempts < 1:
        raise ValueError(f"failed_attempts={failed_attempts} must be >= 1")
    return base_s * float(2 ** (failed_attempts - 1))


def is_expired(enqueued_at_ms: int, now_ms: int, max_event_age_s: int) -> bool:
    """Whether an event is too old to be run (again): `async.max_event_age` counts from the
    moment the 202 was sent, throttled and retried waits included, as in Lambda."""
    return now_ms - enqueued_at_ms > max_event_age_s * 1000


@dataclass(frozen=True, slots=True)
class Retry:
    due_at_ms: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    condition: Condition


def after_failure(
    *, failed_attempts: int, max_retries: int, enqueued_at_ms: int, now_ms: int, max_event_age_s: int, base_s: float
) -> Retry | GiveUp:
    """The decision once attempt number `failed_attempts` failed (a function error or a timeout).

    A retry that could only start after the event's maximum age is not scheduled: the event
    leaves now with EventAgeExceeded rather than waiting to be dropped."""
    if failed_attempts > max_retries:
        return GiveUp(Condition.RETRIES_EXHAUSTED)
    due_at_ms = now_ms + round(retry_delay_s(failed_attempts, base_s) * 1000)
    if is_expired(enqueued_at_ms, due_at_ms, max_event_age_s):
        return GiveUp(Condition.EVENT_AGE_EXCEEDED)
    return Retry(due_at_ms)
