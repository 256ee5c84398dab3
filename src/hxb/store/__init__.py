"""The store: function metadata and logs. `open_store(url)` picks the backend by scheme."""

from __future__ import annotations

from hxb.store.base import FunctionRecord, Store, StoredLogEvent, WorkspaceRecord


async def open_store(url: str) -> Store:
    """`sqlite:///PATH` (the embedded default) or `postgresql://...` (needs hxb[postgres])."""
    from hxb.store.sql import SqlStore

    return await SqlStore.open(url)


__all__ = ["FunctionRecord", "Store", "StoredLogEvent", "WorkspaceRecord", "open_store"]
