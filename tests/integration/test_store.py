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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hxb.errors import StoreError
from hxb.logs.records import LogEvent
from hxb.store import FunctionRecord
from hxb.store.sql import SqlStore

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
        pytest.skip("PostgreSQL (initdb, postgres) is not installed")
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
