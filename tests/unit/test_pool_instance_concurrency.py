"""PoolManager and Worker with concurrency_per_instance > 1, on FakeSandboxes: free slots of warm
instances before cold starts, answers and log lines routed by invocation id, a timeout that
drains the instance, and a crash that fails every invocation in flight."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hxb.testing import Behaviour, FakeRuntime, exit_status, fail_init, serve_concurrently, wait_until
from tests.unit.test_pool_manager import Harness, error_document, request, running, stats


@pytest.fixture
async def harness(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Harness]:
    async with running(Harness(tmp_path), caplog) as h:
        yield h


def held_concurrently(gate: asyncio.Event) -> Behaviour:
    """Answers each invocation with its payload once `gate` is set; invocations overlap."""

    async def handler(meta: dict[str, Any], body: bytes) -> bytes:
        await gate.wait()
        return body

    return serve_concurrently(handler)


async def test_concurrent_invocations_share_one_cold_start(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held_concurrently(gate)
    pool = harness.pool()
    fn = harness.revision(concurrency=3)

    tasks = [asyncio.create_task(pool.invoke(fn, request(str(n).encode()))) for n in range(3)]
    await harness.wait_running(3)

    assert len(harness.factory.started) == 1
    assert pool.statistics() == stats(instances=1, busy=1, cold_starts=1, warm_starts=2)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [r.payload for r in results] == [b"0", b"1", b"2"]
    assert pool.statistics() == stats(instances=1, idle=1, cold_starts=1, warm_starts=2)


async def test_a_busy_instance_with_a_free_slot_is_used_before_another_starts(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held_concurrently(gate)
    pool = harness.pool()
    fn = harness.revision(concurrency=2)

    first = asyncio.create_task(pool.invoke(fn, request(b"1")))
    await harness.wait_running(1)
    second = asyncio.create_task(pool.invoke(fn, request(b"2")))
    await harness.wait_running(2)
    assert len(harness.factory.started) == 1  # the free slot, no cold start
    third = asyncio.create_task(pool.invoke(fn, request(b"3")))
    await harness.wait_running(3)
    assert len(harness.factory.started) == 2  # both slots taken: a second instance
    assert pool.statistics() == stats(instances=2, busy=2, cold_starts=2, warm_starts=1)

    gate.set()
    assert [r.payload for r in await asyncio.gather(first, second, third)] == [b"1", b"2", b"3"]
    assert [len(s.runtime.invokes) for s in harness.factory.sandboxes] == [2, 1]


async def test_a_freed_slot_goes_to_the_oldest_waiter(harness: Harness) -> None:
    gates = {b"1": asyncio.Event(), b"2": asyncio.Event(), b"3": asyncio.Event()}
    slow_init = asyncio.Event()
    factory = harness.factory

    async def handler(meta: dict[str, Any], body: bytes) -> bytes:
        await gates[body].wait()
        return body

    async def behaviour(runtime: FakeRuntime) -> None:
        if runtime.sandbox is not factory.sandboxes[0]:
            await slow_init.wait()  # instances after the first are still starting
        await serve_concurrently(handler)(runtime)

    factory.behaviour = behaviour
    pool = harness.pool()
    fn = harness.revision(concurrency=2)
    first = asyncio.create_task(pool.invoke(fn, request(b"1")))
    second = asyncio.create_task(pool.invoke(fn, request(b"2")))
    await harness.wait_running(2)
    third = asyncio.create_task(pool.invoke(fn, request(b"3")))
    await wait_until(lambda: pool.statistics().waiting == 1)
    assert len(factory.started) == 2  # both slots taken: a second instance starts

    gates[b"2"].set()
    assert (await second).payload == b"2"
    # The slot the second freed went to the waiting third, before the new instance was ready.
    await wait_until(lambda: len(factory.sandboxes[0].runtime.invokes) == 3)
    slow_init.set()
    gates[b"1"].set()
    gates[b"3"].set()
    assert [(await first).payload, (await third).payload] == [b"1", b"3"]
    await wait_until(lambda: pool.statistics().idle == 2)
    assert factory.sandboxes[1].runtime.invokes == []


async def test_answers_are_matched_to_their_invocations_in_any_order(harness: Harness) -> None:
    gates = [asyncio.Event() for _ in range(3)]

    async def handler(meta: dict[str, Any], body: bytes) -> bytes:
        await gates[int(body)].wait()
        return json.dumps({"id": meta["id"], "n": int(body)}).encode()

    harness.factory.behaviour = serve_concurrently(handler)
    pool = harness.pool()
    fn = harness.revision(concurrency=3)
    requests = [request(str(n).encode()) for n in range(3)]
    tasks = [asyncio.create_task(pool.invoke(fn, r)) for r in requests]
    await harness.wait_running(3)

    for n in (2, 0, 1):
        gates[n].set()
        result = await tasks[n]
        assert json.loads(result.payload) == {"id": requests[n].invocation_id, "n": n}
        assert result.invocation_id == requests[n].invocation_id
    assert len(harness.factory.started) == 1


async def test_tagged_lines_go_to_their_invocations_log_and_untagged_ones_to_the_instance(harness: Harness) -> None:
    gate = asyncio.Event()

    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        first, second = await runtime.next_invoke(), await runtime.next_invoke()
        runtime.write_invocation_log(second.invocation_id, "line of the second")
        runtime.write_log("a line of nobody's\n")
        runtime.write_invocation_log(first.invocation_id, "line of the first\ron two lines")
        runtime.write_invocation_log(first.invocation_id, "x" * 300)  # cut at 128 bytes, tag kept
        await gate.wait()
        runtime.send_result(second.invocation_id, b"2")
        runtime.send_result(first.invocation_id, b"1")
        await runtime.next_invoke()

    harness.factory.behaviour = behaviour
    harness.factory.memory_peak_bytes = 3 * 1024 * 1024
    pool = harness.pool(max_line_bytes=128)
    fn = harness.revision(concurrency=2)
    first_req, second_req = request(b"1"), request(b"2")
    first = asyncio.create_task(pool.invoke(fn, first_req))
    await harness.wait_running(1)
    second = asyncio.create_task(pool.invoke(fn, second_req))
    await harness.wait_running(2)
    gate.set()
    await asyncio.gather(first, second)

    first_log = harness.messages(first_req.invocation_id)
    # Each piece of the cut line is 128 bytes with its tag (\x1f + 36-character id + \x1f).
    assert first_log[1:6] == ["line of the first\non two lines", "x" * 90, "x" * 90, "x" * 90, "x" * 30]
    assert harness.messages(second_req.invocation_id)[1] == "line of the second"
    assert harness.messages(None) == ["a line of nobody's"]
    # One REPORT each; the memory figure is the instance's peak, shared by both.
    for invocation_id in (first_req.invocation_id, second_req.invocation_id):
        [report] = [m for m in harness.messages(invocation_id) if m.startswith("REPORT")]
        assert "Max Memory Used: 3 MB" in report


async def test_a_timeout_fails_its_invocation_and_drains_the_instance(harness: Harness) -> None:
    gate, late = asyncio.Event(), asyncio.Event()

    async def handler(meta: dict[str, Any], body: bytes) -> bytes:
        await (late if body == b'"hang"' else gate).wait()
        return body

    harness.factory.behaviour = serve_concurrently(handler)
    pool = harness.pool()
    fn = harness.revision(concurrency=3, timeout_s=0.5)
    hung = asyncio.create_task(pool.invoke(fn, request(b'"hang"')))
    await harness.wait_running(1)
    await asyncio.sleep(0.25)  # the others' deadlines come well after the hung one's
    innocent = [asyncio.create_task(pool.invoke(fn, request(str(n).encode()))) for n in range(2)]
    await harness.wait_running(3)

    timed_out = await hung
    assert error_document(timed_out)["errorType"] == "Sandbox.Timedout"
    sandbox = harness.factory.sandboxes[0]
    assert not sandbox.killed  # the other two still run on it
    assert any("instance drained" in m for m in harness.messages(None))
    # Drained: a new invocation goes to a new instance, not the free slot.
    gate.set()
    fresh = await pool.invoke(fn, request(b'"fresh"'))
    assert fresh.payload == b'"fresh"'
    assert len(harness.factory.started) == 2
    # The timed-out handler answering late is not a protocol violation.
    late.set()
    assert [r.payload for r in await asyncio.gather(*innocent)] == [b"0", b"1"]
    await wait_until(lambda: sandbox.killed)  # killed once the last of them ended, never reused
    assert pool.statistics() == stats(instances=1, idle=1, cold_starts=2, warm_starts=2, timeouts=1)


async def test_a_timeout_with_nothing_else_running_kills_at_once(harness: Harness) -> None:
    late = asyncio.Event()

    async def handler(meta: dict[str, Any], body: bytes) -> bytes:
        await late.wait()
        return body

    harness.factory.behaviour = serve_concurrently(handler)
    pool = harness.pool()

    result = await pool.invoke(harness.revision(concurrency=4, timeout_s=0.05), request())

    assert error_document(result)["errorType"] == "Sandbox.Timedout"
    assert harness.factory.sandboxes[0].killed
    assert pool.statistics().instances == 0


async def test_a_crash_fails_every_invocation_in_flight_with_its_own_id(harness: Harness) -> None:
    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        for _ in range(3):
            await runtime.next_invoke()
        runtime.exit(exit_status(3))

    harness.factory.behaviour = behaviour
    pool = harness.pool()
    fn = harness.revision(concurrency=3)
    requests = [request() for _ in range(3)]

    results = await asyncio.gather(*(pool.invoke(fn, r) for r in requests))

    for req, result in zip(requests, results, strict=True):
        doc = error_document(result)
        assert doc["errorType"] == "Runtime.ExitError"
        assert doc["errorMessage"] == f"RequestId: {req.invocation_id} Error: Runtime exited with error: exit status 3"
    assert pool.statistics().instances == 0


async def test_an_init_error_fails_every_invocation_waiting_for_that_start(harness: Harness) -> None:
    harness.factory.behaviour = fail_init("Runtime.InvalidConcurrency", "not an async def function")
    pool = harness.pool()
    fn = harness.revision(concurrency=2)

    results = await asyncio.gather(*(pool.invoke(fn, request()) for _ in range(2)))

    assert len(harness.factory.started) == 1
    assert [error_document(r)["errorType"] for r in results] == ["Runtime.InvalidConcurrency"] * 2
    assert pool.statistics() == stats()
