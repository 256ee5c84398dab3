"""The store against both databases it supports: SQLite in a file and a real PostgreSQL server
that this module starts (initdb + postgres from the machine, as an unprivileged user)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hxb.errors import StoreError
from hxb.logs.records import LogEvent
from hxb.queue.events import AsyncEvent, Condition, EventState, PendingEvent
from hxb.store import FunctionRecord
from hxb.store.sql import SqlStore
from tests.conftest import missing

PG_BIN = next(
    (
        p.parent
        for p in [Path("/usr/local/bin/initdb"), *sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))]
        if p.exists()
    ),
    None,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if PG_BIN is None:
        missing("PostgreSQL (initdb, postgres) is not installed")
    # initdb refuses to run as root: the server runs as `nobody` in a directory it owns.
    as_user: list[str] = []
    owner = os.getuid()
    if owner == 0:
        owner = pwd.getpwnam("nobody").pw_uid
        as_user = ["setpriv", f"--reuid={owner}", f"--regid={owner}", "--clear-groups", "--"]
    home = Path(tempfile.mkdtemp(prefix="hxb-pg-"))
    os.chown(home, owner, -1)
    data, port = home / "data", _free_port()
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8", "HOME": str(home)}
    subprocess.run(
        [*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-U", "hxb", "--auth=trust", "-E", "UTF8"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    server = subprocess.Popen(
        [*as_user, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(home)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start") from None
                time.sleep(0.05)
        yield f"postgresql://hxb@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    sqlite_url = f"sqlite:///{tmp_path / 'hxb.db'}"
    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = await SqlStore.open(url)
    try:
        yield opened
    finally:
        if request.param == "postgresql":  # one server for the module: leave it empty
            for record in await opened.list_functions():
                await opened.delete_function(record.workspace, record.name)
                await opened.delete_logs(record.workspace, record.name)
            await opened.delete_logs_before(2**62)
        await opened.close()


def _record(name: str, *, workspace: str = "default", revision: str = "r1", sha: str = "a" * 64) -> FunctionRecord:
    return FunctionRecord(
        workspace=workspace,
        name=name,
        revision_id=revision,
        config={"name": name, "memory": 256, "environment": {"K": "v ü"}},
        code_sha256=sha,
        code_size_bytes=123,
        created_at="2026-11-26T00:00:00Z",
        last_modified="2026-11-26T00:00:01Z",
    )


async def test_functions_round_trip_replace_and_delete(store: SqlStore) -> None:
    await store.put_function(_record("a"))
    await store.put_function(_record("b", workspace="team", sha="c" * 64))
    await store.put_function(_record("a", revision="r2", sha="b" * 64))

    got = await store.get_function("default", "a")
    assert got == _record("a", revision="r2", sha="b" * 64)
    assert [r.name for r in await store.list_functions()] == ["a", "b"]
    assert [r.name for r in await store.list_functions("team")] == ["b"]
    assert await store.code_in_use("b" * 64)
    assert not await store.code_in_use("a" * 64)

    assert await store.delete_function("default", "a")
    assert not await store.delete_function("default", "a")
    assert await store.get_function("default", "a") is None


async def test_logs_append_query_page_and_delete(store: SqlStore) -> None:
    events = [LogEvent("default", "f", "stdout", "inv-1", 1000 + i, f"line {i}") for i in range(5)] + [
        LogEvent("default", "f", "stderr", "inv-2", 2000, "nul \x00 and ünïcode"),
        LogEvent("default", "f", "platform", None, 2001, "REPORT"),
        LogEvent("default", "other", "stdout", "inv-3", 2002, "elsewhere"),
    ]
    await store.append_logs(events)
    await store.append_logs([])

    all_f = await store.query_logs("default", "f")
    assert [e.message for e in all_f] == [*(f"line {i}" for i in range(5)), "nul \ufffd and ünïcode", "REPORT"]
    assert [e.stream for e in all_f][-2:] == ["stderr", "platform"]
    assert all_f[-1].invocation_id is None

    first_page = await store.query_logs("default", "f", limit=3)
    rest = await store.query_logs("default", "f", after_id=first_page[-1].id)
    assert [e.id for e in first_page + rest] == [e.id for e in all_f]
    assert [e.message for e in await store.query_logs("default", "f", since_ms=2000)] == [
        "nul \ufffd and ünïcode",
        "REPORT",
    ]
    assert [e.ts_ms for e in await store.query_logs("default", "f", invocation_id="inv-1")] == [
        1000,
        1001,
        1002,
        1003,
        1004,
    ]

    assert await store.delete_logs_before(1003) == 3
    assert await store.delete_logs("default", "f") == 4
    assert [e.message for e in await store.query_logs("default", "other")] == ["elsewhere"]


async def test_many_log_rows_in_one_batch(store: SqlStore) -> None:
    await store.append_logs([LogEvent("default", "bulk", "stdout", "i", n, str(n)) for n in range(2000)])
    rows = await store.query_logs("default", "bulk", limit=5000)
    assert [int(e.message) for e in rows] == list(range(2000))


async def test_bad_url_is_named() -> None:
    with pytest.raises(StoreError, match="not supported"):
        await SqlStore.open("mysql://x/y")
    with pytest.raises(StoreError, match=r"cannot open the store at postgresql://\*\*\*@127\.0\.0\.1"):
        await SqlStore.open(f"postgresql://hxb:secret@127.0.0.1:{_free_port()}/none")


# --- async events ---


def _event(workspace: str, function: str, event_id: str, *, due_at_ms: int = 1000, **fields: Any) -> AsyncEvent:
    return AsyncEvent(
        id=event_id,
        workspace=workspace,
        function=function,
        invoked_arn=f"arn:hxb:lambda:local:{workspace}:function:{function}",
        payload=b'{"n": 1, "bin": "\xff"}' if "payload" not in fields else fields.pop("payload"),
        client_context={"custom": {"k": "v ü"}},
        enqueued_at_ms=500,
        due_at_ms=due_at_ms,
        **fields,
    )


async def test_async_events_round_trip_and_pending_order(store: SqlStore) -> None:
    ws = f"ws-{uuid.uuid4().hex[:8]}"  # the PostgreSQL server is shared by the module's tests
    await store.enqueue_async_event(_event(ws, "f", "late", due_at_ms=3000))
    await store.enqueue_async_event(_event(ws, "f", "early", due_at_ms=1000, payload=bytes(range(256))))
    await store.enqueue_async_event(_event(ws, "g", "middle", due_at_ms=2000))

    got = await store.get_async_event("early")
    assert got == _event(ws, "f", "early", due_at_ms=1000, payload=bytes(range(256)))
    assert await store.get_async_event("nope") is None
    mine = [p for p in await store.list_pending_async_events() if p.workspace == ws]
    assert mine == [
        PendingEvent("early", ws, "f", 1000),
        PendingEvent("middle", ws, "g", 2000),
        PendingEvent("late", ws, "f", 3000),
    ]
    assert await store.count_async_events(ws, "f") == {EventState.PENDING: 2, EventState.DEAD: 0}

    assert await store.delete_async_events(ws, "f") == 2
    assert await store.delete_async_events(ws, "g") == 1


async def test_async_event_retry_finish_and_handover_in_one_transaction(store: SqlStore) -> None:
    ws = f"ws-{uuid.uuid4().hex[:8]}"
    await store.enqueue_async_event(_event(ws, "f", "e1"))

    assert await store.retry_async_event("e1", attempts=1, due_at_ms=9000, error_type="ValueError", error_payload=b"x")
    retried = await store.get_async_event("e1")
    assert retried is not None
    assert (retried.attempts, retried.due_at_ms, retried.error_type, retried.error_payload) == (
        1,
        9000,
        "ValueError",
        b"x",
    )

    handover = _event(ws, "sink", "e2")
    assert await store.finish_async_event("e1", then=handover)
    assert await store.get_async_event("e1") is None
    assert await store.get_async_event("e2") == handover
    # Already finished: nothing happens, and the handover is not enqueued a second time.
    assert not await store.finish_async_event("e1", then=_event(ws, "sink", "e3"))
    assert await store.get_async_event("e3") is None
    assert not await store.retry_async_event("e1", attempts=2, due_at_ms=1, error_type=None, error_payload=None)
    assert await store.finish_async_event("e2")
    assert await store.count_async_events(ws, "sink") == {EventState.PENDING: 0, EventState.DEAD: 0}


async def test_dead_letters_list_redrive_and_delete(store: SqlStore) -> None:
    ws = f"ws-{uuid.uuid4().hex[:8]}"
    for n in range(3):
        await store.enqueue_async_event(_event(ws, "f", f"d{n}"))
        assert await store.dead_letter_async_event(
            f"d{n}",
            attempts=3,
            reason=Condition.RETRIES_EXHAUSTED,
            error_type="ValueError",
            error_payload=b'{"errorType": "ValueError"}',
            at_ms=10_000 + n,
        )
    await store.enqueue_async_event(_event(ws, "f", "waiting"))
    assert not await store.dead_letter_async_event(
        "d0", attempts=3, reason=Condition.EVENT_AGE_EXCEEDED, error_type=None, error_payload=None, at_ms=1
    )

    letters = await store.list_dead_letters(ws, "f")
    assert [e.id for e in letters] == ["d0", "d1", "d2"]
    assert letters[0].state is EventState.DEAD
    assert letters[0].dead_reason is Condition.RETRIES_EXHAUSTED
    assert (letters[0].attempts, letters[0].dead_at_ms, letters[0].error_type) == (3, 10_000, "ValueError")
    assert [e.id for e in await store.list_dead_letters(ws, "f", limit=1)] == ["d0"]
    assert await store.count_async_events(ws, "f") == {EventState.PENDING: 1, EventState.DEAD: 3}

    assert await store.redrive_dead_letters(ws, "f", ["d1", "waiting", "unknown"], now_ms=20_000) == [
        PendingEvent("d1", ws, "f", 20_000)
    ]
    again = await store.get_async_event("d1")
    assert again is not None
    assert (again.state, again.attempts, again.enqueued_at_ms, again.dead_reason) == (
        EventState.PENDING,
        0,
        20_000,
        None,
    )
    assert [p.id for p in await store.redrive_dead_letters(ws, "f", None, now_ms=30_000)] == ["d0", "d2"]
    assert await store.list_dead_letters(ws, "f") == []
    assert await store.redrive_dead_letters(ws, "f", None, now_ms=40_000) == []

    assert await store.delete_async_events(ws, "f") == 4
    assert await store.count_async_events(ws, "f") == {EventState.PENDING: 0, EventState.DEAD: 0}
