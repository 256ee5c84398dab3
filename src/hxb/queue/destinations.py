"""Where an event goes when it leaves the queue, and the record a destination function
receives: the shape of Lambda's destination records, so handlers written for Lambda's
`OnSuccess` / `OnFailure` read them unchanged."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from hxb.queue.events import AsyncEvent, Condition

RECORD_VERSION = "1.0"
_FUNCTION_PREFIX = "function:"


@dataclass(frozen=True, slots=True)
class FunctionDestination:
    name: str


@dataclass(frozen=True, slots=True)
class DeadLetterDestination:
    pass


Destination = FunctionDestination | DeadLetterDestination


def parse_destination(value: str | None) -> Destination | None:
    """`function:<name>`, `dlq` or None (hexabase.yaml already validated the text)."""
    if value is None:
        return None
    if value == "dlq":
        return DeadLetterDestination()
    if value.startswith(_FUNCTION_PREFIX):
        return FunctionDestination(value[len(_FUNCTION_PREFIX) :])
    raise ValueError(f"{value!r} is not a destination (expected function:<name> or dlq)")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptOutcome:
    """What the last attempt returned: the result's status, version and payload."""

    executed_version: str
    payload: bytes
    function_error: bool


def _json_or_text(raw: bytes) -> Any:
    """A payload as the JSON value it holds; as text if it is not JSON (it always is, from
    the gateway and the pool: the fallback keeps a record from failing on a surprise)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", errors="replace")


def _timestamp(epoch_ms: int) -> str:
    seconds, millis = divmod(epoch_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def destination_record(
    event: AsyncEvent,
    *,
    function_arn: str,
    condition: Condition,
    invoke_count: int,
    outcome: AttemptOutcome | None,
    now_ms: int,
) -> dict[str, Any]:
    """The invocation record sent to an on-success or on-failure function.

    `outcome` is None when the event expired before any attempt ran: the record then has no
    `responseContext` / `responsePayload`, as there was no response."""
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "timestamp": _timestamp(now_ms),
        "requestContext": {
            "requestId": event.id,
            "functionArn": function_arn,
            "condition": condition.value,
            "approximateInvokeCount": invoke_count,
        },
        "requestPayload": _json_or_text(event.payload),
    }
    if outcome is not None:
        response: dict[str, Any] = {"statusCode": 200, "executedVersion": outcome.executed_version}
        if outcome.function_error:
            response["functionError"] = "Unhandled"
        record["responseContext"] = response
        record["responsePayload"] = _json_or_text(outcome.payload)
    return record
