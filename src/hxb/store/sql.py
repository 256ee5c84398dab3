"""SqlStore: the one Store implementation, on SQLAlchemy Core (async), for SQLite (the
embedded default, through aiosqlite) and PostgreSQL (through asyncpg)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, event, func, insert, select, update
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from hxb.errors import StoreError
from hxb.logs.records import LogEvent
from hxb.queue.events import AsyncEvent, Condition, EventState, PendingEvent
from hxb.store.base import FunctionRecord, StoredLogEvent, WorkspaceRecord
from hxb.store.schema import async_events, functions, log_events, workspaces

_MIGRATIONS = Path(__file__).parent / "migrations"


def _run_migrations(connection: Connection) -> None:
    # Alembic logs every step at INFO (some while importing); a platform start is not the place.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_conn.cursor()
    # WAL: readers (log queries) never block the writer (the log sink), and a crash loses
    # at most the last transaction. NORMAL sync is durable enough under WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class SqlStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        columns = ("workspace", "function", "stream", "invocation_id", "ts_ms", "message")
        marks = _placeholders(engine.dialect.paramstyle, len(columns))
        self._insert_logs_sql = f"INSERT INTO log_events ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608

    @classmethod
    async def open(cls, url: str) -> SqlStore:
        engine = create_async_engine(_async_url(url))
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_run_migrations)
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            raise StoreError(f"cannot open the store at {_redact(url)}: {exc}") from exc
        return cls(engine)

    async def close(self) -> None:
        await self._engine.dispose()

    # --- functions ------------------------------------------------------------------------------

    async def put_function(self, record: FunctionRecord) -> None:
        values = _record_values(record)
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(functions).where(functions.c.workspace == record.workspace, functions.c.name == record.name)
            )
            await conn.execute(insert(functions).values(**values))

    async def get_function(self, workspace: str, name: str) -> FunctionRecord | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(functions).where(functions.c.workspace == workspace, functions.c.name == name)
                )
            ).first()
        return _record(row._mapping) if row is not None else None

    async def list_functions(self, workspace: str | None = None) -> list[FunctionRecord]:
        query = select(functions).order_by(functions.c.workspace, functions.c.name)
        if workspace is not None:
            query = query.where(functions.c.workspace == workspace)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_record(row._mapping) for row in rows]

    async def delete_function(self, workspace: str, name: str) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(functions).where(functions.c.workspace == workspace, functions.c.name == name)
            )
        return bool(result.rowcount)

    async def code_in_use(self, code_sha256: str) -> bool:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(functions.c.name).where(functions.c.code_sha256 == code_sha256).limit(1))
            ).first()
        return row is not None

    # --- workspaces -----------------------------------------------------------------------------

    async def put_workspace(self, record: WorkspaceRecord) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(workspaces).where(workspaces.c.name == record.name))
            await conn.execute(
                insert(workspaces).values(name=record.name, plan=record.plan, created_at=record.created_at)
            )

    async def list_workspaces(self) -> list[WorkspaceRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(workspaces).order_by(workspaces.c.name))).all()
        return [WorkspaceRecord(name=r.name, plan=r.plan, created_at=r.created_at) for r in rows]

    # --- logs -----------------------------------------------------------------------------------

    async def append_logs(self, events: Sequence[LogEvent]) -> None:
        if not events:
            return
        # Plain tuples through the driver: building SQLAlchemy parameters for thousands of log
        # rows a second cost the event loop more than the rest of an invocation.
        rows = [
            (
                e.workspace,
                e.function,
                e.stream,
                e.invocation_id,
                e.ts_ms,
                # PostgreSQL text cannot hold NUL; SQLite can, but keep both stores alike.
                e.message.replace("\x00", "\ufffd") if "\x00" in e.message else e.message,
            )
            for e in events
        ]
        async with self._engine.begin() as conn:
            await conn.exec_driver_sql(self._insert_logs_sql, rows)

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
        c = log_events.c
        query = select(c.id, c.stream, c.invocation_id, c.ts_ms, c.message).where(
            c.workspace == workspace, c.function == function
        )
        if since_ms is not None:
            query = query.where(c.ts_ms >= since_ms)
        if after_id is not None:
            query = query.where(c.id > after_id)
        if invocation_id is not None:
            query = query.where(c.invocation_id == invocation_id)
        query = query.order_by(c.id).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [StoredLogEvent(r.id, r.stream, r.invocation_id, r.ts_ms, r.message) for r in rows]

    async def delete_logs(self, workspace: str, function: str) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(log_events).where(log_events.c.workspace == workspace, log_events.c.function == function)
            )
        return int(result.rowcount or 0)

    async def delete_logs_before(self, ts_ms: int) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(log_events).where(log_events.c.ts_ms < ts_ms))
        return int(result.rowcount or 0)

    # --- async events ---------------------------------------------------------------------------

    async def enqueue_async_event(self, event: AsyncEvent) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(insert(async_events).values(**_async_event_values(event)))

    async def get_async_event(self, event_id: str) -> AsyncEvent | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(async_events).where(async_events.c.id == event_id))).first()
        return _async_event(row._mapping) if row is not None else None

    async def list_pending_async_events(self) -> list[PendingEvent]:
        c = async_events.c
        query = (
            select(c.id, c.workspace, c.function, c.due_at_ms)
            .where(c.state == EventState.PENDING.value)
            .order_by(c.due_at_ms, c.enqueued_at_ms)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [PendingEvent(r.id, r.workspace, r.function, int(r.due_at_ms)) for r in rows]

    async def retry_async_event(
        self, event_id: str, *, attempts: int, due_at_ms: int, error_type: str | None, error_payload: bytes | None
    ) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(async_events)
                .where(async_events.c.id == event_id, async_events.c.state == EventState.PENDING.value)
                .values(attempts=attempts, due_at_ms=due_at_ms, error_type=error_type, error_payload=error_payload)
            )
        return bool(result.rowcount)

    async def finish_async_event(self, event_id: str, *, then: AsyncEvent | None = None) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(async_events).where(
                    async_events.c.id == event_id, async_events.c.state == EventState.PENDING.value
                )
            )
            if not result.rowcount:
                return False
            # Same transaction: the event is done and its handover is queued, or neither.
            if then is not None:
                await conn.execute(insert(async_events).values(**_async_event_values(then)))
        return True

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
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(async_events)
                .where(async_events.c.id == event_id, async_events.c.state == EventState.PENDING.value)
                .values(
                    state=EventState.DEAD.value,
                    attempts=attempts,
                    dead_reason=reason.value,
                    error_type=error_type,
                    error_payload=error_payload,
                    dead_at_ms=at_ms,
                )
            )
        return bool(result.rowcount)

    async def list_dead_letters(self, workspace: str, function: str, *, limit: int = 100) -> list[AsyncEvent]:
        c = async_events.c
        query = (
            select(async_events)
            .where(c.workspace == workspace, c.function == function, c.state == EventState.DEAD.value)
            .order_by(c.dead_at_ms, c.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_async_event(r._mapping) for r in rows]

    async def redrive_dead_letters(
        self, workspace: str, function: str, event_ids: Sequence[str] | None, *, now_ms: int
    ) -> list[PendingEvent]:
        c = async_events.c
        where = [c.workspace == workspace, c.function == function, c.state == EventState.DEAD.value]
        if event_ids is not None:
            where.append(c.id.in_(list(event_ids)))
        # RETURNING (SQLite >= 3.35, PostgreSQL): exactly the rows this statement changed.
        statement = (
            update(async_events)
            .where(*where)
            .values(
                state=EventState.PENDING.value,
                attempts=0,
                enqueued_at_ms=now_ms,
                due_at_ms=now_ms,
                dead_reason=None,
                dead_at_ms=None,
            )
            .returning(c.id)
        )
        async with self._engine.begin() as conn:
            ids = sorted(r.id for r in (await conn.execute(statement)).all())
        return [PendingEvent(event_id, workspace, function, now_ms) for event_id in ids]

    async def delete_async_events(self, workspace: str, function: str) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(async_events).where(async_events.c.workspace == workspace, async_events.c.function == function)
            )
        return int(result.rowcount or 0)

    async def count_async_events(self, workspace: str, function: str) -> dict[EventState, int]:
        c = async_events.c
        query = select(c.state, func.count()).where(c.workspace == workspace, c.function == function).group_by(c.state)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        counts = dict.fromkeys(EventState, 0)
        counts.update({EventState(state): int(n) for state, n in rows})
        return counts


def _placeholders(paramstyle: str, count: int) -> str:
    if paramstyle == "qmark":
        return ", ".join("?" * count)
    if paramstyle in ("numeric_dollar", "numeric"):
        mark = "$" if paramstyle == "numeric_dollar" else ":"
        return ", ".join(f"{mark}{i}" for i in range(1, count + 1))
    if paramstyle in ("format", "pyformat"):
        return ", ".join(["%s"] * count)
    raise StoreError(f"unsupported database parameter style {paramstyle!r}")


def _record_values(record: FunctionRecord) -> dict[str, Any]:
    return {
        "workspace": record.workspace,
        "name": record.name,
        "revision_id": record.revision_id,
        "config": record.config,
        "code_sha256": record.code_sha256,
        "code_size_bytes": record.code_size_bytes,
        "created_at": record.created_at,
        "last_modified": record.last_modified,
    }


def _record(row: Any) -> FunctionRecord:
    return FunctionRecord(
        workspace=row["workspace"],
        name=row["name"],
        revision_id=row["revision_id"],
        config=dict(row["config"]),
        code_sha256=row["code_sha256"],
        code_size_bytes=int(row["code_size_bytes"]),
        created_at=row["created_at"],
        last_modified=row["last_modified"],
    )


def _async_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreError(f"store URL {url!r} has no scheme (expected sqlite:///PATH or postgresql://...)")
    drivers = {
        "sqlite": "sqlite+aiosqlite",
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
    }
    base = scheme.split("+", 1)[0]
    if base not in drivers:
        raise StoreError(f"store URL scheme {scheme!r} is not supported (expected sqlite or postgresql)")
    return f"{drivers[base]}://{rest}"


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def _async_event_values(event: AsyncEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "workspace": event.workspace,
        "function": event.function,
        "invoked_arn": event.invoked_arn,
        "payload": event.payload,
        "client_context": dict(event.client_context) if event.client_context is not None else None,
        "enqueued_at_ms": event.enqueued_at_ms,
        "due_at_ms": event.due_at_ms,
        "attempts": event.attempts,
        "state": event.state.value,
        "error_type": event.error_type,
        "error_payload": event.error_payload,
        "dead_reason": event.dead_reason.value if event.dead_reason is not None else None,
        "dead_at_ms": event.dead_at_ms,
    }


def _async_event(row: Any) -> AsyncEvent:
    return AsyncEvent(
        id=row["id"],
        workspace=row["workspace"],
        function=row["function"],
        invoked_arn=row["invoked_arn"],
        payload=bytes(row["payload"]),
        client_context=row["client_context"],
        enqueued_at_ms=int(row["enqueued_at_ms"]),
        due_at_ms=int(row["due_at_ms"]),
        attempts=int(row["attempts"]),
        state=EventState(row["state"]),
        error_type=row["error_type"],
        error_payload=bytes(row["error_payload"]) if row["error_payload"] is not None else None,
        dead_reason=Condition(row["dead_reason"]) if row["dead_reason"] is not None else None,
        dead_at_ms=int(row["dead_at_ms"]) if row["dead_at_ms"] is not None else None,
    )
