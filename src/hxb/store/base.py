"""The Store protocol: the platform's metadata and logs. Never on the invoke hot path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hxb.logs.records import LogEvent


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
    async def close(self) -> None: ...
