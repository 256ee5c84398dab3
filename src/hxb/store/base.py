"""The Store protocol: the platform's metadata and logs. Never on the invoke hot path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hxb.logs.records import LogEvent
from hxb.queue.events import AsyncEvent, Condition, EventState, PendingEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class FunctionRecord:
    workspace: str
    name: str
    revision_id: str
    config: dict[str, Any]  # the validated hexabase.yaml `function:` mapping, as JSON
    code_sha256: str
    code_size_bytes: int
    created_at: str  # ISO 8601, UTC
    last_modified: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkspaceRecord:
    name: str
    plan: str  # single, team or enterprise
    created_at: str  # ISO 8601, UTC


@dataclass(frozen=True, slots=True)
class StoredLogEvent:
    id: int
    stream: str
    invocation_id: str | None
    ts_ms: int
    message: str


class Store(Protocol):
    async def put_function(self, record: FunctionRecord) -> None: ...
    async def get_function(self, workspace: str, name: str) -> FunctionRecord | None: ...
    async def list_functions(self, workspace: str | None = None) -> list[FunctionRecord]: ...
    async def delete_function(self, workspace: str, name: str) -> bool: ...
    async def code_in_use(self, code_sha256: str) -> bool: ...

    async def put_workspace(self, record: WorkspaceRecord) -> None:
        """Creates the workspace, or replaces its plan."""
        ...

    async def list_workspaces(self) -> list[WorkspaceRecord]: ...

    async def append_logs(self, events: Sequence[LogEvent]) -> None: ...

    async def query_logs(
        self,
        workspace: str,
        function: str,
        *,
        since_ms: int | None = None,
        after_id: int | None = None,
        invocation_id: str | None = None,
        limit: int = 1000,
    ) -> list[StoredLogEvent]:
        """Oldest first. `after_id` pages forward (what `--follow` uses)."""
        ...

    async def delete_logs(self, workspace: str, function: str) -> int: ...
    async def delete_logs_before(self, ts_ms: int) -> int: ...

    # --- async events ---

    async def enqueue_async_event(self, event: AsyncEvent) -> None:
        """Stores a new event durably: once this returns, a crash does not lose it."""
        ...

    async def get_async_event(self, event_id: str) -> AsyncEvent | None: ...

    async def list_pending_async_events(self) -> list[PendingEvent]:
        """Every pending event, without payloads, earliest due first (the dispatcher's start)."""
        ...

    async def retry_async_event(
        self, event_id: str, *, attempts: int, due_at_ms: int, error_type: str | None, error_payload: bytes | None
    ) -> bool:
        """Records a failed attempt of a pending event and when the next one is due. False if
        the event is no longer pending (its function was deleted meanwhile)."""
        ...

    async def finish_async_event(self, event_id: str, *, then: AsyncEvent | None = None) -> bool:
        """Deletes a pending event that is done (succeeded, or handed to a destination function)
        and, in the same transaction, enqueues `then` (the destination's event). False, and
        nothing enqueued, if the event was no longer pending."""
        ...

    async def dead_letter_async_event(
        self,
        event_id: str,
        *,
        attempts: int,
        reason: Condition,
        error_type: str | None,
        error_payload: bytes | None,
        at_ms: int,
    ) -> bool:
        """Moves a pending event to its function's dead-letter list. False if it was gone."""
        ...

    async def list_dead_letters(self, workspace: str, function: str, *, limit: int = 100) -> list[AsyncEvent]:
        """Oldest dead letter first."""
        ...

    async def redrive_dead_letters(
        self, workspace: str, function: str, event_ids: Sequence[str] | None, *, now_ms: int
    ) -> list[PendingEvent]:
        """Puts dead letters (all of the function's, or those named) back in the queue as new
        events: no attempts yet, their age counted from `now_ms`, due at once."""
        ...

    async def delete_async_events(self, workspace: str, function: str) -> int:
        """Drops the function's pending events and dead letters (the function was deleted)."""
        ...

    async def count_async_events(self, workspace: str, function: str) -> dict[EventState, int]: ...

    async def close(self) -> None: ...
