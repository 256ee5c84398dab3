"""The asynchronous event record, as the store keeps it, and the errors of the dead-letter API.
A leaf module: the store imports it."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hxb.errors import ClientError


class EventState(enum.StrEnum):
    # Waiting for its next attempt (or running: the store does not know, and need not: an
    # event still pending after a crash is simply run again).
    PENDING = "pending"
    # Retries exhausted or too old, with no function to deliver it to: the dead-letter list.
    DEAD = "dead"


class Condition(enum.StrEnum):
    """Why an event left the queue: Lambda's `requestContext.condition`."""

    SUCCESS = "Success"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    EVENT_AGE_EXCEEDED = "EventAgeExceeded"


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncEvent:
    """One event: what the caller sent, and where it stands. Its id is the request id the
    caller got with the 202 and every attempt's invocation id (Lambda keeps one request id
    across retries)."""

    id: str
    workspace: str
    function: str
    invoked_arn: str
    payload: bytes
    client_context: Mapping[str, Any] | None
    enqueued_at_ms: int
    due_at_ms: int
    attempts: int = 0  # attempts that ran and failed (a throttle is not one)
    state: EventState = EventState.PENDING
    error_type: str | None = None  # of the last failed attempt
    error_payload: bytes | None = None  # the last failed attempt's error document
    dead_reason: Condition | None = None
    dead_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """What the dispatcher keeps in memory per waiting event: no payload (up to 256 KB each),
    which it reads from the store when the event runs."""

    id: str
    workspace: str
    function: str
    due_at_ms: int


class DeadLetterNotFoundError(ClientError):
    """A dead-letter id that the function's list does not hold (never was, or redriven)."""

    error_type = "Client.DeadLetterNotFound"
    http_status = 404

    def __init__(self, function: str, event_id: str) -> None:
        super().__init__(f"function {function!r} has no dead-lettered event {event_id!r}")
        self.function = function
        self.event_id = event_id
