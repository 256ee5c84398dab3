"""The asynchronous queue's rules without a clock or a store: retry backoff and the decision
after a failed attempt, the destination record, and the schedule (due order, the in-flight
cap per function, throttle pauses, no event handed out twice)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hxb.errors import InternalError
from hxb.queue.destinations import (
    AttemptOutcome,
    DeadLetterDestination,
    FunctionDestination,
    destination_record,
    parse_destination,
)
from hxb.queue.events import AsyncEvent, Condition, PendingEvent
from hxb.queue.policy import GiveUp, Retry, after_failure, is_expired, retry_delay_s
from hxb.queue.schedule import Schedule

HOUR_S = 3600


# --- policy -------------------------------------------------------------------------------------


def test_retry_delay_doubles_from_the_base() -> None:
    assert [retry_delay_s(n, 1.0) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert retry_delay_s(2, 0.05) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="failed_attempts=0"):
        retry_delay_s(0, 1.0)


def _decide(
    failed_attempts: int, max_retries: int = 2, *, age_s: float = 0, max_age_s: int = HOUR_S, base_s: float = 1.0
) -> Retry | GiveUp:
    now_ms = 10_000_000
    return after_failure(
        failed_attempts=failed_attempts,
        max_retries=max_retries,
        enqueued_at_ms=now_ms - int(age_s * 1000),
        now_ms=now_ms,
        max_event_age_s=max_age_s,
        base_s=base_s,
    )


def test_failed_attempts_are_retried_with_backoff_until_max_retries() -> None:
    assert _decide(1) == Retry(10_000_000 + 1000)
    assert _decide(2) == Retry(10_000_000 + 2000)
    assert _decide(3) == GiveUp(Condition.RETRIES_EXHAUSTED)


def test_zero_max_retries_gives_up_after_the_first_attempt() -> None:
    assert _decide(1, max_retries=0) == GiveUp(Condition.RETRIES_EXHAUSTED)


def test_a_retry_that_would_start_past_the_max_age_is_not_scheduled() -> None:
    # 59.5 s old, 60 s max, the next retry 1 s away: it could only start too late.
    assert _decide(1, age_s=59.5, max_age_s=60) == GiveUp(Condition.EVENT_AGE_EXCEEDED)
    assert _decide(1, age_s=58.5, max_age_s=60) == Retry(10_000_000 + 1000)


def test_expiry_counts_from_the_enqueue_time() -> None:
    assert not is_expired(0, 60_000, 60)
    assert is_expired(0, 60_001, 60)


# --- destinations -------------------------------------------------------------------------------


def test_parse_destination() -> None:
    assert parse_destination("function:audit-log") == FunctionDestination("audit-log")
    assert parse_destination("dlq") == DeadLetterDestination()
    assert parse_destination(None) is None
    with pytest.raises(ValueError, match="not a destination"):
        parse_destination("sqs:queue")


def _event(**fields: Any) -> AsyncEvent:
    base = {
        "id": "req-1",
        "workspace": "default",
        "function": "orders",
        "invoked_arn": "arn:hxb:lambda:local:default:function:orders",
        "payload": b'{"order": 7}',
        "client_context": None,
        "enqueued_at_ms": 1000,
        "due_at_ms": 1000,
    }
    return AsyncEvent(**{**base, **fields})


def test_failure_record_has_lambdas_shape() -> None:
    record = destination_record(
        _event(),
        function_arn="arn:hxb:lambda:local:default:function:orders:$LATEST",
        condition=Condition.RETRIES_EXHAUSTED,
        invoke_count=3,
        outcome=AttemptOutcome(
            executed_version="$LATEST",
            payload=b'{"errorMessage": "boom", "errorType": "ValueError"}',
            function_error=True,
        ),
        now_ms=1_700_000_000_123,
    )

    assert record == {
        "version": "1.0",
        "timestamp": "2023-11-14T22:13:20.123Z",
        "requestContext": {
            "requestId": "req-1",
            "functionArn": "arn:hxb:lambda:local:default:function:orders:$LATEST",
            "condition": "RetriesExhausted",
            "approximateInvokeCount": 3,
        },
        "requestPayload": {"order": 7},
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "responsePayload": {"errorMessage": "boom", "errorType": "ValueError"},
    }
    json.dumps(record)  # what the destination function receives: JSON


def test_success_record_has_no_function_error() -> None:
    record = destination_record(
        _event(),
        function_arn="arn",
        condition=Condition.SUCCESS,
        invoke_count=1,
        outcome=AttemptOutcome(executed_version="$LATEST", payload=b"42", function_error=False),
        now_ms=0,
    )
    assert record["requestContext"]["condition"] == "Success"
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert record["responsePayload"] == 42


def test_expired_before_any_attempt_has_no_response() -> None:
    record = destination_record(
        _event(), function_arn="arn", condition=Condition.EVENT_AGE_EXCEEDED, invoke_count=0, outcome=None, now_ms=0
    )
    assert "responseContext" not in record
    assert "responsePayload" not in record
    assert record["requestContext"]["approximateInvokeCount"] == 0


# --- schedule -----------------------------------------------------------------------------------


def _p(event_id: str, due_ms: int = 0, function: str = "f") -> PendingEvent:
    return PendingEvent(event_id, "default", function, due_ms)


def test_due_events_start_in_due_order_and_later_ones_wait() -> None:
    schedule = Schedule(max_in_flight=10)
    for event in (_p("b", 20), _p("a", 10), _p("c", 30), _p("late", 500)):
        schedule.add(event)

    assert [e.id for e in schedule.take_due(now_ms=30)] == ["a", "b", "c"]
    assert schedule.take_due(now_ms=30) == []
    assert schedule.next_due_ms() == 500
    assert [e.id for e in schedule.take_due(now_ms=500)] == ["late"]


def test_an_event_is_never_scheduled_twice() -> None:
    schedule = Schedule(max_in_flight=10)
    assert schedule.add(_p("a"))
    assert not schedule.add(_p("a"))
    [running] = schedule.take_due(0)
    assert not schedule.add(_p("a"))  # running: the store's copy at start must not duplicate it
    schedule.finished(running)
    assert schedule.add(_p("a"))


def test_at_most_max_in_flight_per_function_run_at_once() -> None:
    schedule = Schedule(max_in_flight=2)
    for i in range(5):
        schedule.add(_p(f"f{i}"))
    schedule.add(_p("g0", function="g"))

    first = schedule.take_due(0)
    assert sorted(e.id for e in first) == ["f0", "f1", "g0"]
    assert schedule.running("default", "f") == 2
    assert schedule.waiting("default", "f") == 3
    # A function at its cap needs no timer: only a finished attempt frees a place.
    assert schedule.next_due_ms() is None

    schedule.finished(first[0])
    assert [e.id for e in schedule.take_due(0)] == ["f2"]


def test_a_throttled_event_keeps_its_place_and_pauses_its_function() -> None:
    schedule = Schedule(max_in_flight=10)
    schedule.add(_p("a", 0))
    schedule.add(_p("b", 5))
    schedule.add(_p("other", 0, function="g"))
    taken = {e.id: e for e in schedule.take_due(5)}

    schedule.throttled(taken["a"], until_ms=1000)
    schedule.throttled(taken["b"], until_ms=1000)

    assert schedule.take_due(999) == []
    assert schedule.next_due_ms() == 1000
    assert [e.id for e in schedule.take_due(1000)] == ["a", "b"]


def test_reschedule_sets_the_new_due_time() -> None:
    schedule = Schedule(max_in_flight=10)
    schedule.add(_p("a", 0))
    [running] = schedule.take_due(0)

    again = schedule.reschedule(running, 2000)

    assert again.due_at_ms == 2000
    assert schedule.take_due(1999) == []
    assert [e.id for e in schedule.take_due(2000)] == ["a"]


def test_forget_function_drops_its_waiting_events() -> None:
    schedule = Schedule(max_in_flight=1)
    schedule.add(_p("a"))
    schedule.add(_p("b"))
    schedule.add(_p("c", function="g"))
    [running_a, running_c] = schedule.take_due(0)

    schedule.forget_function("default", "f")

    assert schedule.waiting("default", "f") == 0
    schedule.finished(running_a)  # the running one finishes normally
    assert schedule.take_due(0) == []
    assert len(schedule) == 1  # only g's running event is left
    schedule.finished(running_c)
    assert len(schedule) == 0


def test_finishing_an_event_that_is_not_running_is_a_bug() -> None:
    schedule = Schedule(max_in_flight=1)
    schedule.add(_p("a"))
    with pytest.raises(InternalError, match="not running"):
        schedule.finished(_p("a"))
