"""The management API of asynchronous invocations: `/v1/functions/{name}/async` (a function's
event counters) and `/v1/functions/{name}/dlq...` (its dead-letter list: list, show, redrive)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hxb.concurrency.workspaces import Workspaces
from hxb.errors import ClientError
from hxb.queue.dispatcher import AsyncDispatcher
from hxb.queue.events import AsyncEvent, EventState
from hxb.registry import FunctionRegistry

_MAX_BODY_BYTES = 256 * 1024
_MAX_LIST = 1000
_MAX_REDRIVE_IDS = 1000


def _iso(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    seconds, millis = divmod(epoch_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _json_value(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", errors="replace")


def dead_letter_summary(event: AsyncEvent) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "enqueued_at": _iso(event.enqueued_at_ms),
        "dead_at": _iso(event.dead_at_ms),
        "attempts": event.attempts,
        "reason": event.dead_reason.value if event.dead_reason is not None else None,
        "error_type": event.error_type,
        "payload_bytes": len(event.payload),
    }


def dead_letter_view(event: AsyncEvent) -> dict[str, Any]:
    return {
        **dead_letter_summary(event),
        "invoked_arn": event.invoked_arn,
        "payload": _json_value(event.payload),
        "error": _json_value(event.error_payload),
    }


class AsyncApi:
    def __init__(
        self, *, registry: FunctionRegistry, queue: AsyncDispatcher, workspaces: Workspaces, default_workspace: str
    ) -> None:
        self._registry = registry
        self._queue = queue
        self._workspaces = workspaces
        self._default = default_workspace

    def _target(self, request: Request) -> tuple[str, str]:
        """The workspace (`?workspace=`, else the default one) and the function, which must exist."""
        workspace = request.query_params.get("workspace") or self._default
        self._workspaces.get(workspace)
        name: str = request.path_params["name"]
        self._registry.get(workspace, name)
        return workspace, name

    async def function_async(self, request: Request) -> Response:
        workspace, name = self._target(request)
        stored = await self._queue.stored_counts(workspace, name)
        return JSONResponse(
            {
                "name": name,
                "workspace": workspace,
                "statistics": dataclasses.asdict(self._queue.statistics(workspace, name)),
                "pending": stored[EventState.PENDING],
                "dead_letters": stored[EventState.DEAD],
            }
        )

    async def list_dead_letters(self, request: Request) -> Response:
        workspace, name = self._target(request)
        raw = request.query_params.get("limit") or "100"
        if not raw.isdigit() or not 1 <= int(raw) <= _MAX_LIST:
            raise ClientError(f"query parameter limit={raw!r} must be between 1 and {_MAX_LIST}")
        events = await self._queue.dead_letters(workspace, name, limit=int(raw))
        return JSONResponse({"dead_letters": [dead_letter_summary(e) for e in events]})

    async def get_dead_letter(self, request: Request) -> Response:
        workspace, name = self._target(request)
        event = await self._queue.dead_letter(workspace, name, request.path_params["event_id"])
        return JSONResponse(dead_letter_view(event))

    async def redrive(self, request: Request) -> Response:
        workspace, name = self._target(request)
        ids = await _event_ids(request)
        redriven = await self._queue.redrive(workspace, name, ids)
        return JSONResponse({"redriven": redriven})


async def _event_ids(request: Request) -> list[str] | None:
    """`{"event_ids": [...]}` names the dead letters to redrive; no body (or no key): all."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY_BYTES:
            raise ClientError(f"a redrive request is at most {_MAX_BODY_BYTES} bytes")
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ClientError(f"the body is not valid JSON: {exc}") from None
    ids = doc.get("event_ids") if isinstance(doc, dict) else None
    if ids is None and isinstance(doc, dict):
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise ClientError('the body must be {"event_ids": ["<event id>", ...]} (or empty: every dead letter)')
    if not ids or len(ids) > _MAX_REDRIVE_IDS:
        raise ClientError(f"event_ids must name 1 to {_MAX_REDRIVE_IDS} dead letters")
    return list(dict.fromkeys(ids))
