"""Provisioned concurrency with real instances: a PoolManager on the local sandbox and the real
Python bootstrap initialises provisioned instances before the first invocation, that invocation
reports no Init Duration, and a provisioned instance that is killed is started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hxb.config import LogSettings, PoolSettings
from hxb.logs.records import LogEvent
from hxb.models import FunctionRevision, InvocationRequest
from hxb.pool.manager import PoolManager
from hxb.runtimes import RuntimeCatalog
from hxb.sandbox.local import LocalSandboxFactory
from hxb.spec import FunctionConfig
from hxb.testing import wait_until
from tests.conftest import missing

# Module-level code runs once per instance, at init: each line of inits.log is one init.
INDEX_PY = """
import json, os, time

with open(os.path.join(os.environ["PROBE_DIR"], "inits.log"), "a") as fh:
    fh.write(json.dumps({"pid": os.getpid(), "type": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"]}) + "\\n")

def handler(event, context):
    return {"pid": os.getpid()}
"""


@dataclass
class RealPool:
    pool: PoolManager
    revision: FunctionRevision
    probe_dir: Path
    events: list[LogEvent] = field(default_factory=list)

    def inits(self) -> list[dict[str, object]]:
        path = self.probe_dir / "inits.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def report(self, invocation_id: str) -> str:
        [line] = [e.message for e in self.events if e.invocation_id == invocation_id and e.message.startswith("REPORT")]
        return line


@pytest.fixture
async def real_pool(tmp_path: Path) -> AsyncIterator[RealPool]:
    data_dir = tmp_path / "data"
    probe_dir = tmp_path / "probe"
    code_dir = tmp_path / "code"
    for directory in (data_dir, probe_dir, code_dir):
        directory.mkdir()
    (code_dir / "index.py").write_text(INDEX_PY)
    catalog = await RuntimeCatalog.discover(data_dir)
    runtimes = catalog.list()
    if not runtimes:
        missing("no python3.X interpreter on this host")
    runtime = next((r for r in runtimes if r.name == "python3.11"), runtimes[0])
    config = FunctionConfig(name="warm", runtime=runtime.name, environment={"PROBE_DIR": str(probe_dir)})
    revision = FunctionRevision(
        workspace="default",
        name="warm",
        version="$LATEST",
        revision_id="r1",
        config=config,
        code_dir=code_dir,
        code_sha256="0" * 64,
        code_size_bytes=len(INDEX_PY),
        runtime=runtime,
        region="local",
        last_modified="2024-01-01T00:00:00Z",
    )
    events: list[LogEvent] = []
    factory = LocalSandboxFactory(data_dir / "instances")
    pool = PoolManager(PoolSettings(shutdown_grace_s=1.0), LogSettings(), factory, catalog, events.append)
    pool.start()
    try:
        yield RealPool(pool, revision, probe_dir, events)
    finally:
        await pool.close()  # stops every instance it started, even when the test failed
        await factory.close()


def request(invocation_id: str) -> InvocationRequest:
    return InvocationRequest(
        invocation_id=invocation_id, payload=b"{}", invoked_arn="arn:hxb:lambda:local:default:function:warm"
    )


async def test_provisioned_instances_are_initialised_before_the_first_invocation(real_pool: RealPool) -> None:
    pool, fn = real_pool.pool, real_pool.revision

    pool.set_provisioned(fn, 2)
    await asyncio.wait_for(pool.wait_provisioned(fn.key), timeout=30)

    inits = real_pool.inits()
    assert [i["type"] for i in inits] == ["provisioned-concurrency"] * 2
    assert pool.function_statistics("default", "warm").provisioned == 2

    invocation_id = str(uuid.uuid4())
    result = await pool.invoke(fn, request(invocation_id))

    assert not result.function_error, result.payload
    assert result.init_duration_ms is None
    assert "Init Duration" not in real_pool.report(invocation_id)
    assert real_pool.inits() == inits  # served by an instance that was already initialised
    assert json.loads(result.payload)["pid"] in {i["pid"] for i in inits}


async def test_killed_provisioned_instance_is_started_again(real_pool: RealPool) -> None:
    pool, fn = real_pool.pool, real_pool.revision
    pool.set_provisioned(fn, 1)
    await asyncio.wait_for(pool.wait_provisioned(fn.key), timeout=30)
    [first] = real_pool.inits()

    os.kill(int(str(first["pid"])), signal.SIGKILL)
    await wait_until(lambda: len(real_pool.inits()) == 2 and pool.statistics().provisioned == 1, timeout_s=30)

    second = real_pool.inits()[1]
    assert second["pid"] != first["pid"]
    assert second["type"] == "provisioned-concurrency"
    result = await pool.invoke(fn, request(str(uuid.uuid4())))
    assert result.init_duration_ms is None
