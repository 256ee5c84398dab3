"""PoolManager with the real Worker on FakeSandboxes: warm reuse, cold starts, deadlines, failures
of the runtime, retiring, reaping, the node cap, shutdown and the invocation logs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hxb.config import LogSettings, PoolSettings
from hxb.errors import ThrottledError
from hxb.logs.records import LogEvent
from hxb.models import FunctionRevision, InvocationRequest, InvocationResult
from hxb.pool.manager import PoolManager, PoolStatistics
from hxb.pool.wire import HEADER, FrameType
from hxb.runtimes import RuntimeCatalog, RuntimeInfo
from hxb.spec import FunctionConfig
from hxb.testing import (
    Behaviour,
    FakeRuntime,
    FakeSandboxFactory,
    echo,
    exit_on_invoke,
    exit_status,
    fail_init,
    hang,
    never_ready,
    serve,
    wait_until,
)

RUNTIME = RuntimeInfo(name="python3.11", family="python", version="3.11.2", executable=Path(sys.executable))
MIB = 1024 * 1024


class PrecompiledCatalog(RuntimeCatalog):
    """`RuntimeCatalog.ensure_compiled` byte-compiles the bootstrap in a subprocess of the
    runtime's interpreter; unit tests start no processes, so here it is already done."""

    def __init__(self, bootstrap_root: Path) -> None:
        super().__init__([RUNTIME], bootstrap_root=bootstrap_root)
        self.compiled: list[str] = []

    async def ensure_compiled(self, runtime: RuntimeInfo) -> None:
        self.compiled.append(runtime.name)


@dataclass
class Harness:
    tmp_path: Path
    factory: FakeSandboxFactory = field(default_factory=FakeSandboxFactory)
    events: list[LogEvent] = field(default_factory=list)
    pools: list[PoolManager] = field(default_factory=list)

    def pool(self, *, max_line_bytes: int | None = None, **settings: Any) -> PoolManager:
        pool = PoolManager(
            PoolSettings(**settings),
            LogSettings() if max_line_bytes is None else LogSettings(max_line_bytes=max_line_bytes),
            self.factory,
            PrecompiledCatalog(self.tmp_path / "runtimes"),
            self.events.append,
        )
        self.pools.append(pool)
        return pool

    def revision(self, name: str = "echo", *, timeout_s: float | None = None, concurrency: int = 1) -> FunctionRevision:
        config = FunctionConfig(name=name, runtime=RUNTIME.name, concurrency_per_instance=concurrency)
        if timeout_s is not None:
            # The spec allows whole seconds only (1-900); unit tests cannot wait that long.
            config = config.model_copy(update={"timeout": timeout_s})
        return FunctionRevision(
            workspace="default",
            name=name,
            version="$LATEST",
            revision_id="r1",
            config=config,
            code_dir=self.tmp_path / "code" / name,
            code_sha256="0" * 64,
            code_size_bytes=0,
            runtime=RUNTIME,
            region="local",
            last_modified="2024-01-01T00:00:00Z",
        )

    def invokes_received(self) -> int:
        return sum(len(s.runtime.invokes) for s in self.factory.sandboxes)

    async def wait_running(self, count: int) -> None:
        """Until `count` invocations have reached their instances (and so are past `_acquire`)."""
        await wait_until(lambda: self.invokes_received() == count)

    def messages(self, invocation_id: str | None) -> list[str]:
        return [e.message for e in self.events if e.invocation_id == invocation_id]


H = TypeVar("H", bound=Harness)


@contextlib.asynccontextmanager
async def running(h: H, caplog: pytest.LogCaptureFixture) -> AsyncIterator[H]:
    """Yields `h`; then closes its pools and factory and checks nothing was logged as an error."""
    try:
        yield h
    finally:
        for pool in h.pools:
            await pool.close()
        await h.factory.close()
    # A background task of the pool that failed is logged, not raised: it is a bug all the same.
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("hxb") and r.levelno >= logging.ERROR]
    assert errors == []


@pytest.fixture
async def harness(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Harness]:
    async with running(Harness(tmp_path), caplog) as h:
        yield h


def request(
    payload: bytes = b"{}", *, invocation_id: str | None = None, want_log_tail: bool = False
) -> InvocationRequest:
    return InvocationRequest(
        invocation_id=invocation_id or str(uuid.uuid4()),
        payload=payload,
        invoked_arn="arn:hxb:lambda:local:default:function:echo",
        want_log_tail=want_log_tail,
    )


def error_document(result: InvocationResult) -> dict[str, Any]:
    assert result.function_error, result
    doc: dict[str, Any] = json.loads(result.payload)
    return doc


def held(gate: asyncio.Event) -> Behaviour:
    """Answers with the payload once `gate` is set."""

    async def handler(meta: dict[str, Any], body: bytes) -> bytes:
        await gate.wait()
        return body

    return serve(handler)


def stats(**fields: int) -> PoolStatistics:
    """PoolStatistics with every figure 0 but `fields`."""
    zeros = dict.fromkeys((f.name for f in dataclasses.fields(PoolStatistics)), 0)
    return PoolStatistics(**(zeros | fields))


# --- warm reuse and cold starts -------------------------------------------------------------------


async def test_second_invoke_reuses_the_warm_instance(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision()

    first = await pool.invoke(fn, request(b'{"n":1}'))
    second = await pool.invoke(fn, request(b'{"n":2}'))

    assert (first.payload, second.payload) == (b'{"n":1}', b'{"n":2}')
    assert not first.function_error
    assert not second.function_error
    assert len(harness.factory.started) == 1
    assert pool.statistics() == stats(instances=1, idle=1, cold_starts=1, warm_starts=1)
    assert first.init_duration_ms is not None
    assert second.init_duration_ms is None


async def test_spawn_passes_the_revision_to_the_sandbox_spec(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision("greeter")

    await pool.invoke(fn, request())

    [spec] = harness.factory.started
    assert spec.runtime == RUNTIME
    assert spec.code_dir == fn.code_dir
    assert spec.memory_limit_mib == fn.config.memory
    assert spec.env["AWS_LAMBDA_FUNCTION_NAME"] == "greeter"
    assert spec.env["_HANDLER"] == fn.config.handler
    assert spec.env["LAMBDA_TASK_ROOT"] == "/var/task"
    assert spec.argv[0] == str(RUNTIME.executable)


async def test_sequential_invokes_start_one_instance(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision()

    for n in range(4):
        result = await pool.invoke(fn, request(str(n).encode()))
        assert result.payload == str(n).encode()

    assert len(harness.factory.started) == 1
    assert pool.statistics() == stats(instances=1, idle=1, cold_starts=1, warm_starts=3)


async def test_concurrent_invokes_start_one_instance_each(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held(gate)
    pool = harness.pool()
    fn = harness.revision()

    tasks = [asyncio.create_task(pool.invoke(fn, request(str(n).encode()))) for n in range(3)]
    await harness.wait_running(3)
    assert pool.statistics() == stats(instances=3, busy=3, cold_starts=3)
    gate.set()
    results = await asyncio.gather(*tasks)

    assert sorted(r.payload for r in results) == [b"0", b"1", b"2"]
    assert len(harness.factory.started) == 3
    assert pool.statistics() == stats(instances=3, idle=3, cold_starts=3)


async def test_released_instance_goes_to_the_oldest_waiter(harness: Harness) -> None:
    first_hold, second_hold, slow_init = asyncio.Event(), asyncio.Event(), asyncio.Event()
    factory = harness.factory

    async def behaviour(runtime: FakeRuntime) -> None:
        if runtime.sandbox is not factory.sandboxes[0]:
            await slow_init.wait()  # instances after the first are still starting
        runtime.send_ready()
        while True:
            invoke = await runtime.next_invoke()
            if invoke.body == b'"first"':
                await first_hold.wait()
            elif invoke.body == b'"second"':
                await second_hold.wait()
            runtime.send_result(invoke.invocation_id, json.dumps(runtime.sandbox.instance_id).encode())

    factory.behaviour = behaviour
    pool = harness.pool()
    fn = harness.revision()
    t1 = asyncio.create_task(pool.invoke(fn, request(b'"first"')))
    await harness.wait_running(1)
    t2 = asyncio.create_task(pool.invoke(fn, request(b'"second"')))
    await wait_until(lambda: pool.statistics().waiting == 1)
    t3 = asyncio.create_task(pool.invoke(fn, request(b'"third"')))
    await wait_until(lambda: pool.statistics().waiting == 2)

    first_hold.set()  # instance 0 is released while both others are still starting
    await t1
    await wait_until(lambda: len(factory.sandboxes[0].runtime.invokes) == 2)
    assert factory.sandboxes[0].runtime.invokes[1].body == b'"second"'
    slow_init.set()
    third = await t3
    second_hold.set()
    second = await t2

    assert json.loads(second.payload) == factory.sandboxes[0].instance_id
    assert json.loads(third.payload) != factory.sandboxes[0].instance_id


# --- failures before the invocation runs ---------------------------------------------------------


async def test_init_error_fails_exactly_one_waiting_invocation_and_kills_the_instance(harness: Harness) -> None:
    fail_gate, ready_gate = asyncio.Event(), asyncio.Event()
    factory = harness.factory

    async def behaviour(runtime: FakeRuntime) -> None:
        if runtime.sandbox is factory.sandboxes[0]:
            await fail_gate.wait()
            runtime.send_init_error("Runtime.ImportModuleError", "Unable to import module 'index'")
            return
        await ready_gate.wait()
        await echo(runtime)

    factory.behaviour = behaviour
    pool = harness.pool()
    fn = harness.revision()
    t1 = asyncio.create_task(pool.invoke(fn, request(b"1")))
    t2 = asyncio.create_task(pool.invoke(fn, request(b"2")))
    await wait_until(lambda: len(factory.sandboxes) == 2)
    assert pool.statistics() == stats(instances=2, starting=2, waiting=2)

    fail_gate.set()
    failed = await t1
    assert not t2.done()
    ready_gate.set()
    served = await t2

    assert error_document(failed)["errorType"] == "Runtime.ImportModuleError"
    assert failed.error_type == "Runtime.ImportModuleError"
    assert (served.payload, served.function_error) == (b"2", False)
    assert factory.sandboxes[0].killed
    assert not factory.sandboxes[1].killed
    assert pool.statistics() == stats(instances=1, idle=1, cold_starts=1)


async def test_init_error_is_reported_with_its_own_log(harness: Harness) -> None:
    harness.factory.behaviour = fail_init("Runtime.HandlerNotFound", "Handler 'handler' missing on module 'index'")
    pool = harness.pool()

    result = await pool.invoke(harness.revision(), request(invocation_id="inv-init", want_log_tail=True))

    assert error_document(result) == {
        "errorType": "Runtime.HandlerNotFound",
        "errorMessage": "Handler 'handler' missing on module 'index'",
    }
    lines = harness.messages("inv-init")
    assert lines[0] == "START RequestId: inv-init Version: $LATEST"
    assert lines[1] == "[ERROR] Runtime.HandlerNotFound: Handler 'handler' missing on module 'index'"
    assert lines[2] == "END RequestId: inv-init"
    assert lines[3].startswith("REPORT RequestId: inv-init\t")
    assert result.log_tail is not None
    assert "Runtime.HandlerNotFound" in result.log_tail


async def test_init_timeout_kills_the_instance(harness: Harness) -> None:
    harness.factory.behaviour = never_ready
    pool = harness.pool(init_timeout_s=0.02)

    result = await pool.invoke(harness.revision(), request())

    assert result.error_type == "Sandbox.Timedout"
    assert "Init phase timed out" in error_document(result)["errorMessage"]
    assert harness.factory.sandboxes[0].killed
    assert pool.statistics().instances == 0


async def test_spawn_failure_is_reported_as_sandbox_spawn_failed(harness: Harness) -> None:
    harness.factory.start_error = OSError(24, "Too many open files")
    pool = harness.pool()

    result = await pool.invoke(harness.revision(), request())

    assert result.error_type == "Sandbox.SpawnFailed"
    assert "Too many open files" in error_document(result)["errorMessage"]
    assert pool.statistics() == stats()


# --- failures during the invocation --------------------------------------------------------------


async def test_timed_out_instance_is_killed_and_never_reused(harness: Harness) -> None:
    harness.factory.behaviour = hang
    pool = harness.pool()
    fn = harness.revision(timeout_s=0.05)

    result = await pool.invoke(fn, request(invocation_id="inv-slow"))

    assert result.error_type == "Sandbox.Timedout"
    assert error_document(result) == {
        "errorType": "Sandbox.Timedout",
        "errorMessage": "RequestId: inv-slow Error: Task timed out after 0.05 seconds",
    }
    assert harness.factory.sandboxes[0].killed
    assert pool.statistics() == stats(cold_starts=1, timeouts=1)

    harness.factory.behaviour = echo
    again = await pool.invoke(fn, request(b"2"))
    assert again.payload == b"2"
    assert len(harness.factory.started) == 2


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (exit_status(1), "exit status 1"),
        (int(signal.SIGSEGV), "signal: segmentation fault"),
        (int(signal.SIGKILL), "signal: killed"),
    ],
)
async def test_runtime_exiting_mid_invoke_is_an_exit_error(harness: Harness, status: int, words: str) -> None:
    harness.factory.behaviour = exit_on_invoke(status)
    pool = harness.pool()
    fn = harness.revision()

    result = await pool.invoke(fn, request(invocation_id="inv-crash"))

    assert result.error_type == "Runtime.ExitError"
    assert error_document(result) == {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"RequestId: inv-crash Error: Runtime exited with error: {words}",
    }
    assert pool.statistics().instances == 0
    harness.factory.behaviour = echo
    assert (await pool.invoke(fn, request(b"3"))).payload == b"3"
    assert len(harness.factory.started) == 2


async def test_function_error_keeps_the_instance(harness: Harness) -> None:
    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        while True:
            invoke = await runtime.next_invoke()
            runtime.send_error(invoke.invocation_id, "KeyError", "'x'", ['  File "index.py", line 2\n'])

    harness.factory.behaviour = behaviour
    pool = harness.pool()
    fn = harness.revision()

    first = await pool.invoke(fn, request())
    await pool.invoke(fn, request())

    assert error_document(first)["errorType"] == "KeyError"
    assert first.error_type is None  # the function's own error, not the platform's
    assert not harness.factory.sandboxes[0].killed
    assert len(harness.factory.started) == 1


def _answer_with(raw: bytes) -> Behaviour:
    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        await runtime.next_invoke()
        runtime.send_raw(raw)

    return behaviour


@pytest.mark.parametrize(
    ("raw", "error_type"),
    [
        pytest.param(HEADER.pack(99, 0, 0), "Runtime.InvalidResponse", id="unknown-frame-type"),
        pytest.param(HEADER.pack(FrameType.INVOKE, 0, 0), "Runtime.InvalidResponse", id="invoke-from-runtime"),
        pytest.param(HEADER.pack(FrameType.READY, 0, 0), "Runtime.InvalidResponse", id="ready-during-invoke"),
        pytest.param(HEADER.pack(FrameType.RESULT, 0, 2048), "Function.ResponseSizeTooLarge", id="result-too-large"),
    ],
)
async def test_protocol_violation_kills_the_instance(harness: Harness, raw: bytes, error_type: str) -> None:
    harness.factory.behaviour = _answer_with(raw)
    pool = harness.pool(max_response_bytes=1024)
    fn = harness.revision()

    result = await pool.invoke(fn, request())

    assert result.error_type == error_type
    assert error_document(result)["errorType"] == error_type
    assert harness.factory.sandboxes[0].killed
    assert pool.statistics().instances == 0
    harness.factory.behaviour = echo
    assert (await pool.invoke(fn, request(b"4"))).payload == b"4"
    assert len(harness.factory.started) == 2


async def test_result_at_the_size_limit_is_delivered(harness: Harness) -> None:
    harness.factory.behaviour = serve(lambda meta, body: b"x" * 1024)
    pool = harness.pool(max_response_bytes=1024)

    result = await pool.invoke(harness.revision(), request())

    assert result.payload == b"x" * 1024
    assert not result.function_error


async def test_unsolicited_frame_from_an_idle_instance_kills_it(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision()
    await pool.invoke(fn, request())
    sandbox = harness.factory.sandboxes[0]

    sandbox.runtime.send_ready()
    await wait_until(lambda: pool.statistics().instances == 0)

    assert sandbox.killed
    assert (await pool.invoke(fn, request(b"5"))).payload == b"5"
    assert len(harness.factory.started) == 2


async def test_instance_exiting_while_idle_is_dropped(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision()
    await pool.invoke(fn, request())
    sandbox = harness.factory.sandboxes[0]

    sandbox.runtime.exit(exit_status(0))
    await wait_until(lambda: pool.statistics().instances == 0)

    assert sandbox.closed
    assert "[hxb] instance exited while idle" in harness.messages(None)
    assert (await pool.invoke(fn, request(b"6"))).payload == b"6"
    assert len(harness.factory.started) == 2


# --- retiring, reaping, the node cap and shutdown ------------------------------------------------


async def test_retire_stops_idle_instances_at_once(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision()
    await pool.invoke(fn, request())
    sandbox = harness.factory.sandboxes[0]

    pool.retire(fn.key)
    await wait_until(lambda: sandbox.closed)

    assert sandbox.terminated
    assert not sandbox.killed
    assert pool.statistics().instances == 0


async def test_retire_stops_a_busy_instance_when_its_invocation_ends(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held(gate)
    pool = harness.pool()
    fn = harness.revision()
    task = asyncio.create_task(pool.invoke(fn, request(b"7")))
    await harness.wait_running(1)
    sandbox = harness.factory.sandboxes[0]

    pool.retire(fn.key)
    await asyncio.sleep(0)
    assert sandbox.signals == []
    gate.set()
    result = await task
    await wait_until(lambda: sandbox.closed)

    assert result.payload == b"7"
    assert sandbox.signals == [signal.SIGTERM]
    assert pool.statistics().instances == 0


async def test_reap_idle_stops_stale_instances_and_keeps_fresh_ones(harness: Harness) -> None:
    first_hold, second_hold = asyncio.Event(), asyncio.Event()

    async def handler(meta: dict[str, Any], body: bytes) -> bytes:
        await (first_hold if body == b"1" else second_hold).wait()
        return body

    harness.factory.behaviour = serve(handler)
    pool = harness.pool(idle_timeout_s=60.0)
    fn = harness.revision()
    t1 = asyncio.create_task(pool.invoke(fn, request(b"1")))
    t2 = asyncio.create_task(pool.invoke(fn, request(b"2")))
    await harness.wait_running(2)
    first_hold.set()
    await t1
    between = time.monotonic()
    second_hold.set()
    await t2
    [stale] = [s for s in harness.factory.sandboxes if s.runtime.invokes[0].body == b"1"]
    [fresh] = [s for s in harness.factory.sandboxes if s.runtime.invokes[0].body == b"2"]

    assert pool.reap_idle(between + 59.0) == 0
    assert pool.reap_idle(between + 60.0) == 1
    await wait_until(lambda: stale.closed)

    assert stale.terminated
    assert not stale.killed
    assert not fresh.terminated
    assert pool.statistics() == stats(instances=1, idle=1, cold_starts=2)


async def test_instance_cap_evicts_the_least_recently_used_idle_instance(harness: Harness) -> None:
    pool = harness.pool(max_instances=2)
    a, b, c = harness.revision("a"), harness.revision("b"), harness.revision("c")
    await pool.invoke(a, request())
    await pool.invoke(b, request())
    await pool.invoke(a, request())  # now b is the least recently used
    sandbox_a, sandbox_b = harness.factory.sandboxes

    result = await pool.invoke(c, request(b"8"))
    await wait_until(lambda: sandbox_b.closed)

    assert result.payload == b"8"
    assert sandbox_b.terminated
    assert not sandbox_a.terminated
    assert pool.statistics().instances == 2


async def test_instance_cap_throttles_when_no_instance_is_idle(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held(gate)
    pool = harness.pool(max_instances=1)
    busy = asyncio.create_task(pool.invoke(harness.revision("a"), request(b"9")))
    await harness.wait_running(1)

    with pytest.raises(ThrottledError, match="HXB_POOL_MAX_INSTANCES"):
        await pool.invoke(harness.revision("b"), request())

    assert pool.statistics() == stats(instances=1, busy=1, cold_starts=1)
    gate.set()
    assert (await busy).payload == b"9"
    assert len(harness.factory.started) == 1


async def test_close_kills_an_instance_that_ignores_sigterm_after_the_grace_period(harness: Harness) -> None:
    harness.factory.ignore_sigterm = True
    pool = harness.pool(shutdown_grace_s=0.01)
    await pool.invoke(harness.revision(), request())
    sandbox = harness.factory.sandboxes[0]

    await pool.close()

    assert sandbox.signals == [signal.SIGTERM, signal.SIGKILL]
    assert sandbox.closed
    assert pool.statistics() == stats(cold_starts=1)


async def test_close_stops_instances_with_sigterm_only_when_they_obey(harness: Harness) -> None:
    pool = harness.pool(shutdown_grace_s=5.0)
    await pool.invoke(harness.revision("a"), request())
    await pool.invoke(harness.revision("b"), request())

    await pool.close()

    assert [s.signals for s in harness.factory.sandboxes] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert all(s.closed for s in harness.factory.sandboxes)


async def test_close_ends_a_running_invocation_with_an_error(harness: Harness) -> None:
    harness.factory.behaviour = hang
    pool = harness.pool(shutdown_grace_s=0.01)
    task = asyncio.create_task(pool.invoke(harness.revision(), request()))
    await harness.wait_running(1)

    await pool.close()
    result = await task

    assert result.error_type == "Runtime.ExitError"
    assert harness.factory.sandboxes[0].terminated


async def test_invoke_after_close_is_refused(harness: Harness) -> None:
    pool = harness.pool()
    await pool.close()

    with pytest.raises(ThrottledError, match="shutting down"):
        await pool.invoke(harness.revision(), request())

    assert harness.factory.started == []


# --- invocation logs -----------------------------------------------------------------------------


def _logging_behaviour() -> Behaviour:
    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.write_log("init: loading\n")
        runtime.send_ready()
        while True:
            invoke = await runtime.next_invoke()
            runtime.write_log(f"handling {invoke.invocation_id}\n")
            runtime.write_log("no newline")
            runtime.send_result(invoke.invocation_id, b"null")

    return behaviour


async def test_logs_frame_each_invocation_with_start_end_and_report(harness: Harness) -> None:
    harness.factory.behaviour = _logging_behaviour()
    pool = harness.pool()
    fn = harness.revision()

    for invocation_id in ("inv-1", "inv-2"):
        await pool.invoke(fn, request(invocation_id=invocation_id))

    for invocation_id in ("inv-1", "inv-2"):
        lines = harness.messages(invocation_id)
        assert lines[:4] == [
            f"START RequestId: {invocation_id} Version: $LATEST",
            f"handling {invocation_id}",
            "no newline",
            f"END RequestId: {invocation_id}",
        ]
        assert lines[4].startswith(f"REPORT RequestId: {invocation_id}\tDuration: ")
        assert len(lines) == 5
    stream = harness.events[0].stream
    assert all(e.stream == stream and e.function == "echo" for e in harness.events)


async def test_init_duration_is_reported_on_the_first_invocation_only(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision()

    for invocation_id in ("inv-1", "inv-2"):
        await pool.invoke(fn, request(invocation_id=invocation_id))

    [first_report] = [m for m in harness.messages("inv-1") if m.startswith("REPORT")]
    [second_report] = [m for m in harness.messages("inv-2") if m.startswith("REPORT")]
    assert "\tInit Duration: " in first_report
    assert "Init Duration" not in second_report


async def test_report_shows_the_memory_peak_in_whole_mib(harness: Harness) -> None:
    harness.factory.memory_peak_bytes = 3 * MIB + 1
    pool = harness.pool()

    await pool.invoke(harness.revision(), request(invocation_id="inv-mem"))

    [report] = [m for m in harness.messages("inv-mem") if m.startswith("REPORT")]
    assert "\tMemory Size: 128 MB\tMax Memory Used: 4 MB" in report


async def test_output_outside_an_invocation_has_no_invocation_id(harness: Harness) -> None:
    harness.factory.behaviour = _logging_behaviour()
    pool = harness.pool()
    await pool.invoke(harness.revision(), request(invocation_id="inv-1"))
    runtime = harness.factory.sandboxes[0].runtime

    runtime.write_log("background thread says hi\n")
    await wait_until(lambda: "background thread says hi" in harness.messages(None))

    assert "init: loading" in harness.messages(None)


async def test_output_written_while_idle_is_not_attributed_to_the_next_invocation(harness: Harness) -> None:
    pool = harness.pool()
    fn = harness.revision()
    await pool.invoke(fn, request(invocation_id="inv-1"))
    runtime = harness.factory.sandboxes[0].runtime

    # Written between invocations, and not yet read when the next invocation starts.
    runtime.write_log("idle output\n")
    await pool.invoke(fn, request(invocation_id="inv-2"))

    assert "idle output" not in harness.messages("inv-2")
    assert "idle output" in harness.messages(None)


async def test_log_tail_is_returned_when_asked(harness: Harness) -> None:
    harness.factory.behaviour = _logging_behaviour()
    pool = harness.pool()
    fn = harness.revision()

    with_tail = await pool.invoke(fn, request(invocation_id="inv-t", want_log_tail=True))
    without = await pool.invoke(fn, request(invocation_id="inv-n"))

    assert with_tail.log_tail is not None
    assert with_tail.log_tail.startswith("START RequestId: inv-t Version: $LATEST\nhandling inv-t\n")
    assert "REPORT RequestId: inv-t" in with_tail.log_tail
    assert without.log_tail is None


async def test_timeout_is_logged_in_the_invocation(harness: Harness) -> None:
    harness.factory.behaviour = hang
    pool = harness.pool()

    await pool.invoke(harness.revision(timeout_s=0.02), request(invocation_id="inv-slow"))

    lines = harness.messages("inv-slow")
    assert lines[1].endswith("Z inv-slow Task timed out after 0.02 seconds")
    assert lines[2] == "END RequestId: inv-slow"
    assert lines[3].endswith("\tStatus: timeout")


# --- regressions from review ---------------------------------------------------------------------


async def test_close_lets_a_retire_in_its_grace_period_end_with_sigkill(harness: Harness) -> None:
    harness.factory.ignore_sigterm = True
    pool = harness.pool(shutdown_grace_s=0.05)
    fn = harness.revision()
    await pool.invoke(fn, request())
    sandbox = harness.factory.sandboxes[0]
    pool.retire(fn.key)  # SIGTERM now, SIGKILL after the grace period
    await wait_until(lambda: sandbox.signals == [signal.SIGTERM])

    await pool.close()

    # The stop under way was not cancelled midway: nobody else would kill the instance.
    assert sandbox.signals == [signal.SIGTERM, signal.SIGKILL]
    assert sandbox.closed


async def test_an_instance_that_dies_right_after_ready_fails_its_invocation_cleanly(harness: Harness) -> None:
    async def ready_then_die(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        runtime.exit(exit_status(4))  # both reach the platform in the same loop turn

    harness.factory.behaviour = ready_then_die
    pool = harness.pool()

    result = await pool.invoke(harness.revision(), request())

    assert error_document(result)["errorType"] == "Runtime.ExitError"
    await wait_until(lambda: harness.factory.sandboxes[0].closed)
    assert pool.statistics().instances == 0


async def test_an_answer_for_another_invocation_kills_the_instance(harness: Harness) -> None:
    async def answers_for_someone_else(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        while True:
            await runtime.next_invoke()
            runtime.send_result(str(uuid.uuid4()), b'"stale"')

    harness.factory.behaviour = answers_for_someone_else
    pool = harness.pool()

    result = await pool.invoke(harness.revision(), request())

    assert error_document(result)["errorType"] == "Runtime.InvalidResponse"
    assert harness.factory.sandboxes[0].killed
