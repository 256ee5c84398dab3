"""Worker on a FakeSandbox, driven frame by frame: the orders in which a runtime's frames can
arrive relative to the platform asking for them."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from hxb.logs.records import LogEvent
from hxb.models import FunctionRevision
from hxb.pool.worker import Worker, WorkerState
from hxb.runtimes import RuntimeInfo
from hxb.spec import FunctionConfig
from hxb.testing import FakeSandbox

RUNTIME = RuntimeInfo(name="python3.11", family="python", version="3.11.2", executable=Path(sys.executable))


def _revision(tmp_path: Path) -> FunctionRevision:
    return FunctionRevision(
        workspace="default",
        name="early",
        version="$LATEST",
        revision_id="r1",
        config=FunctionConfig(name="early"),
        code_dir=tmp_path,
        code_sha256="0" * 64,
        code_size_bytes=0,
        runtime=RUNTIME,
        region="local",
        last_modified="2026-01-01T00:00:00Z",
    )


async def test_a_ready_sent_before_the_platform_asks_for_it_is_not_a_protocol_error(tmp_path: Path) -> None:
    # A zygote-forked runtime can be READY before the platform has attached to its channel.
    sandbox = FakeSandbox("early")
    events: list[LogEvent] = []
    await sandbox.runtime.start()
    sandbox.runtime.send_ready()
    await asyncio.sleep(0.01)  # the READY is in the platform's socket buffer before attach
    worker = Worker(
        sandbox=sandbox,
        revision=_revision(tmp_path),
        stream="s",
        emit_log=events.append,
        max_response_bytes=1024,
        max_line_bytes=1024,
        on_dead=lambda _: None,
        spawn_started=time.perf_counter(),
    )
    await worker.attach()
    await asyncio.sleep(0.01)  # data_received runs now, with nobody waiting yet

    await worker.wait_ready(init_timeout_s=1)

    assert not sandbox.killed
    assert worker.state is WorkerState.STARTING
    assert sandbox.ready_calls == 1
    await worker.kill()
    await sandbox.dispose()
