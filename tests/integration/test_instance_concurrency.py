"""Per-instance concurrency (`concurrency_per_instance: N`): an `async def` handler's instance
serves up to N invocations at once, each with its own context, deadline and log lines; a
plain `def` handler is refused at init; a timeout drains the instance instead of failing the
invocations running beside it."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx

from tests.conftest import INSTANCE_ID, HxbServer
from tests.integration._helpers import function_error, unique

SLEEPER = f"""
import asyncio, logging, os, time
async def handler(event, context):
    start = time.monotonic()
    remaining = context.get_remaining_time_in_millis()
    print("hello from", context.aws_request_id)
    logging.info("record of %s", context.aws_request_id)
    await asyncio.sleep(event.get("sleep", 1))
    print("bye from", context.aws_request_id, end="")  # no newline: still ends up whole, in its log
    return {{
        "instance": {INSTANCE_ID},
        "request_id": context.aws_request_id,
        "start": start,
        "end": time.monotonic(),
        "remaining_ms": remaining,
    }}
"""


def _invoke_all(server: HxbServer, name: str, payloads: list[Any]) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(lambda p: server.invoke(name, p), payloads))


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert "x-amz-function-error" not in response.headers, response.text
    body: dict[str, Any] = response.json()
    return body


def test_four_invocations_share_one_instance_at_once(hxb_server: HxbServer) -> None:
    name = unique("shared")
    hxb_server.deploy(name, {"index.py": SLEEPER}, concurrency_per_instance=4, timeout=10)

    responses = _invoke_all(hxb_server, name, [{"sleep": 1}] * 4)
    results = [_ok(r) for r in responses]

    assert len({r["instance"] for r in results}) == 1
    # They overlapped: every one started before any of them ended.
    assert max(r["start"] for r in results) < min(r["end"] for r in results)
    request_ids = [r.headers["x-amzn-requestid"] for r in responses]
    assert [r["request_id"] for r in results] == request_ids
    assert len(set(request_ids)) == 4
    for r in results:
        assert 0 < r["remaining_ms"] <= 10_000
    with hxb_server.client() as c:
        instances = c.get(f"/v1/functions/{name}").json()["instances"]
    assert (instances["idle"], instances["busy"]) == (1, 0)


def test_each_invocations_output_lands_in_its_own_log(hxb_server: HxbServer) -> None:
    name = unique("logs")
    hxb_server.deploy(name, {"index.py": SLEEPER}, concurrency_per_instance=4)

    responses = _invoke_all(hxb_server, name, [{"sleep": 0.5}] * 4)
    request_ids = [r.headers["x-amzn-requestid"] for r in responses]
    assert len({_ok(r)["instance"] for r in responses}) == 1

    for request_id in request_ids:
        events = hxb_server.wait_for_log(name, f"REPORT RequestId: {request_id}", invocation_id=request_id)
        messages = [e["message"] for e in events]
        assert f"hello from {request_id}" in messages
        assert f"bye from {request_id}" in messages
        [record] = [m for m in messages if "record of" in m]
        assert record.startswith("[INFO]")
        assert record.endswith(f"\t{request_id}\trecord of {request_id}")
        # Nobody else's lines, and no tag left on any line.
        others = [m for m in messages for other in request_ids if other != request_id and other in m]
        assert others == []
        assert not any("\x1f" in m for m in messages)


def test_two_slots_per_instance_make_two_instances_for_four_calls(hxb_server: HxbServer) -> None:
    name = unique("pairs")
    hxb_server.deploy(name, {"index.py": SLEEPER}, concurrency_per_instance=2)

    results = [_ok(r) for r in _invoke_all(hxb_server, name, [{"sleep": 1}] * 4)]

    by_instance: dict[str, int] = {}
    for r in results:
        by_instance[r["instance"]] = by_instance.get(r["instance"], 0) + 1
    assert sorted(by_instance.values()) == [2, 2]


def test_a_sync_handler_with_more_than_one_slot_is_refused_at_init(hxb_server: HxbServer) -> None:
    name = unique("sync")
    hxb_server.deploy(name, {"index.py": "def handler(event, context):\n    return 1\n"}, concurrency_per_instance=3)

    doc = function_error(hxb_server.invoke(name))

    assert doc["errorType"] == "Runtime.InvalidConcurrency"
    assert "not an async def function" in doc["errorMessage"]
    assert "concurrency_per_instance is 3" in doc["errorMessage"]


TIMEOUT_MIX = f"""
import asyncio, os, time
async def handler(event, context):
    print("started", context.aws_request_id)
    await asyncio.sleep(event["sleep"])
    return {{"instance": {INSTANCE_ID}, "start": time.monotonic()}}
"""


def test_a_timeout_fails_only_its_invocation_and_the_instance_is_then_retired(hxb_server: HxbServer) -> None:
    name = unique("drain")
    hxb_server.deploy(name, {"index.py": TIMEOUT_MIX}, concurrency_per_instance=3, timeout=3)
    # Warm one instance, so that every call below lands on it.
    first = _ok(hxb_server.invoke(name, {"sleep": 0}))["instance"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        hung = pool.submit(hxb_server.invoke, name, {"sleep": 30})
        hxb_server.wait_for_log(name, "started")
        time.sleep(1.5)
        # These start before the first one's deadline and are still running when it passes.
        innocent = [pool.submit(hxb_server.invoke, name, {"sleep": 2.5}) for _ in range(2)]
        doc = function_error(hung.result())
        assert doc["errorType"] == "Sandbox.Timedout"
        # While the instance drains, a new invocation goes elsewhere.
        assert _ok(hxb_server.invoke(name, {"sleep": 0}))["instance"] != first
        assert [_ok(f.result())["instance"] for f in innocent] == [first, first]

    hxb_server.wait_for_log(name, "instance drained")
    # The instance that had a timed-out handler is never reused.
    assert all(_ok(hxb_server.invoke(name, {"sleep": 0}))["instance"] != first for _ in range(3))


def test_one_slot_is_still_one_invocation_per_instance(hxb_server: HxbServer) -> None:
    name = unique("single")
    hxb_server.deploy(name, {"index.py": SLEEPER})

    results = [_ok(r) for r in _invoke_all(hxb_server, name, [{"sleep": 0.5}] * 3)]

    assert len({r["instance"] for r in results}) == 3
