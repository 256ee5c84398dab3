"""Asynchronous invocation (`X-Amz-Invocation-Type: Event`) against a real `hxb serve`: the 202,
the limits, retries into the dead-letter list, destination functions, redrive, throttles that
wait, and events that survive a killed platform without running twice after success.

The functions prove they ran by appending to files in a directory of the test (passed in their
environment), so these servers run the `local` sandbox, where instances see the host's files.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HxbServer, server_env
from tests.integration._helpers import api_error, management_error, unique

EVENT = {"X-Amz-Invocation-Type": "Event"}
EVENT_PAYLOAD_LIMIT_BYTES = 256 * 1024
# Fast retries and throttle waits, so that a test sees three attempts in well under a second.
FAST = {
    "HXB_SANDBOX_MODE": "local",
    "HXB_ASYNC_RETRY_BASE_S": "0.05",
    "HXB_ASYNC_THROTTLE_DELAY_S": "0.05",
}

# Appends "<request id> <event as JSON>" to $MARK_DIR/<function>.log; fails while
# $MARK_DIR/<function>.fail exists, or when the event says so; sleeps if asked.
RECORDER = """
import json, os, time
def handler(event, context):
    path = os.path.join(os.environ["MARK_DIR"], context.function_name)
    if isinstance(event, dict) and event.get("sleep"):
        time.sleep(event["sleep"])
    with open(path + ".log", "a") as fh:
        fh.write(context.aws_request_id + " " + json.dumps(event) + "\\n")
    if os.path.exists(path + ".fail") or (isinstance(event, dict) and event.get("fail")):
        raise ValueError("failing on purpose: " + context.aws_request_id)
    return {"ok": context.aws_request_id}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HxbServer]:
    srv = HxbServer(data_dir=tmp_path_factory.mktemp("hxb-async"), env=server_env(**FAST))
    srv.start()
    yield srv
    srv.shutdown()


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    directory = tmp_path / "marks"
    directory.mkdir()
    return directory


def _deploy(server: HxbServer, name: str, marks: Path, **config: Any) -> None:
    server.deploy(name, {"index.py": RECORDER}, environment={"MARK_DIR": str(marks)}, **config)


def _enqueue(server: HxbServer, name: str, payload: Any = None) -> str:
    response = server.invoke(name, payload if payload is not None else {}, headers=EVENT)
    assert response.status_code == 202, response.text
    request_id: str = response.headers["x-amzn-requestid"]
    return request_id


def _runs(marks: Path, name: str) -> list[tuple[str, Any]]:
    """(request id, event) of every run of `name`, in order."""
    path = marks / f"{name}.log"
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        request_id, _, event = line.partition(" ")
        runs.append((request_id, json.loads(event)))
    return runs


def _wait(condition: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _get(server: HxbServer, path: str) -> httpx.Response:
    with server.client() as c:
        return c.get(path)


def _summary(server: HxbServer, name: str) -> dict[str, Any]:
    response = _get(server, f"/v1/functions/{name}/async")
    assert response.status_code == 200, response.text
    summary: dict[str, Any] = response.json()
    return summary


def _dead_letters(server: HxbServer, name: str) -> list[dict[str, Any]]:
    response = _get(server, f"/v1/functions/{name}/dlq")
    assert response.status_code == 200, response.text
    letters: list[dict[str, Any]] = response.json()["dead_letters"]
    return letters


def _start_lines(server: HxbServer, name: str, request_id: str) -> int:
    return sum(e["message"].startswith(f"START RequestId: {request_id}") for e in server.logs(name))


# --- accepting events ---------------------------------------------------------------------------


def test_event_returns_202_at_once_and_the_function_runs(server: HxbServer, marks: Path) -> None:
    name = unique("async-ok")
    _deploy(server, name, marks)

    started = time.monotonic()
    response = server.invoke(name, {"sleep": 1, "n": 1}, headers=EVENT)
    elapsed = time.monotonic() - started

    assert response.status_code == 202, response.text
    assert response.content == b""
    request_id = response.headers["x-amzn-requestid"]
    assert elapsed < 1, "the 202 waited for the function"
    runs = _wait(lambda: _runs(marks, name), "the event to run")
    assert runs == [(request_id, {"sleep": 1, "n": 1})]
    server.wait_for_log(name, f"END RequestId: {request_id}")
    summary = _wait(lambda: (s := _summary(server, name))["statistics"]["succeeded"] == 1 and s, "the success count")
    assert summary["statistics"]["queued"] == 1
    assert summary["pending"] == 0
    assert summary["dead_letters"] == 0


def test_event_payload_over_256_kb_is_refused_with_413(server: HxbServer, marks: Path) -> None:
    name = unique("async-big")
    _deploy(server, name, marks)
    exactly = b'"' + b"x" * (EVENT_PAYLOAD_LIMIT_BYTES - 2) + b'"'
    over = b'"' + b"x" * (EVENT_PAYLOAD_LIMIT_BYTES - 1) + b'"'

    refused = server.invoke(name, raw=over, headers=EVENT)
    accepted = server.invoke(name, raw=exactly, headers=EVENT)

    api_error(refused, 413, "RequestTooLargeException")
    assert accepted.status_code == 202, accepted.text
    runs = _wait(lambda: _runs(marks, name), "the largest event to run")
    assert [r[0] for r in runs] == [accepted.headers["x-amzn-requestid"]]


def test_event_for_an_unknown_function_is_404(server: HxbServer) -> None:
    response = server.invoke(unique("nobody"), {}, headers=EVENT)

    api_error(response, 404, "ResourceNotFoundException")


# --- retries, dead letters, destinations --------------------------------------------------------


def test_failing_event_is_retried_max_retries_times_then_dead_lettered(server: HxbServer, marks: Path) -> None:
    default = unique("async-fail")
    once = unique("async-fail-once")
    _deploy(server, default, marks)  # async.max_retries defaults to 2
    _deploy(server, once, marks, async_={"max_retries": 0})

    request_id = _enqueue(server, default, {"fail": True, "n": 1})
    single = _enqueue(server, once, {"fail": True})

    [letter] = _wait(lambda: _dead_letters(server, default), "the dead letter")
    assert letter["event_id"] == request_id
    assert letter["attempts"] == 3
    assert letter["reason"] == "RetriesExhausted"
    assert letter["error_type"] == "ValueError"
    assert [r[0] for r in _runs(marks, default)] == [request_id] * 3
    # Every attempt is a normal invocation with its START/END/REPORT, under the one request id.
    server.wait_for_log(default, f"REPORT RequestId: {request_id}")
    _wait(lambda: _start_lines(server, default, request_id) == 3, "three START lines")

    shown = _get(server, f"/v1/functions/{default}/dlq/{request_id}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["payload"] == {"fail": True, "n": 1}
    assert shown.json()["error"]["errorMessage"] == f"failing on purpose: {request_id}"
    stats = _summary(server, default)["statistics"]
    assert (stats["retried"], stats["dead_lettered"], stats["succeeded"]) == (2, 1, 0)

    [single_letter] = _wait(lambda: _dead_letters(server, once), "the other dead letter")
    assert single_letter["attempts"] == 1
    assert [r[0] for r in _runs(marks, once)] == [single]


def test_on_failure_function_receives_the_failure_record(server: HxbServer, marks: Path) -> None:
    sink = unique("async-sink")
    source = unique("async-src")
    _deploy(server, sink, marks)
    _deploy(server, source, marks, async_={"max_retries": 1, "on_failure": f"function:{sink}"})

    request_id = _enqueue(server, source, {"fail": True, "order": 7})

    [(_, record)] = _wait(lambda: _runs(marks, sink), "the failure record")
    assert record["version"] == "1.0"
    assert record["requestContext"] == {
        "requestId": request_id,
        "functionArn": f"arn:hxb:lambda:local:default:function:{source}:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 2,
    }
    assert record["requestPayload"] == {"fail": True, "order": 7}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"}
    assert record["responsePayload"]["errorType"] == "ValueError"
    assert record["timestamp"].endswith("Z")
    # Delivered, so not dead-lettered.
    assert _dead_letters(server, source) == []
    assert _summary(server, source)["statistics"]["delivered_on_failure"] == 1


def test_on_success_function_receives_the_success_record(server: HxbServer, marks: Path) -> None:
    sink = unique("async-ok-sink")
    source = unique("async-ok-src")
    _deploy(server, sink, marks)
    _deploy(server, source, marks, async_={"on_success": f"function:{sink}"})

    request_id = _enqueue(server, source, {"order": 8})

    [(_, record)] = _wait(lambda: _runs(marks, sink), "the success record")
    assert record["requestContext"]["requestId"] == request_id
    assert record["requestContext"]["condition"] == "Success"
    assert record["requestContext"]["approximateInvokeCount"] == 1
    assert record["requestPayload"] == {"order": 8}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert record["responsePayload"] == {"ok": request_id}


def test_dlq_destination_and_redrive_runs_dead_letters_again(server: HxbServer, marks: Path) -> None:
    name = unique("async-redrive")
    _deploy(server, name, marks, async_={"max_retries": 0, "on_failure": "dlq"})
    (marks / f"{name}.fail").touch()
    ids = [_enqueue(server, name, {"n": n}) for n in range(3)]
    _wait(lambda: len(_dead_letters(server, name)) == 3, "three dead letters")
    (marks / f"{name}.fail").unlink()

    with server.client() as c:
        one = c.post(f"/v1/functions/{name}/dlq/redrive", json={"event_ids": [ids[0]]})
        unknown = c.post(f"/v1/functions/{name}/dlq/redrive", json={"event_ids": ["no-such-event"]})
    assert one.status_code == 200, one.text
    assert one.json() == {"redriven": [ids[0]]}
    management_error(unknown, 404)
    _wait(lambda: sum(r[0] == ids[0] for r in _runs(marks, name)) == 2, "the redriven event to run")
    assert sorted(d["event_id"] for d in _dead_letters(server, name)) == sorted(ids[1:])

    with server.client() as c:
        rest = c.post(f"/v1/functions/{name}/dlq/redrive")
    assert sorted(rest.json()["redriven"]) == sorted(ids[1:])
    _wait(lambda: len(_runs(marks, name)) == 6, "every redriven event to run")
    assert _dead_letters(server, name) == []
    _wait(lambda: _summary(server, name)["pending"] == 0, "the queue to empty")
    assert _summary(server, name)["statistics"]["succeeded"] == 3


def test_deleting_a_function_drops_its_dead_letters(server: HxbServer, marks: Path) -> None:
    name = unique("async-del")
    _deploy(server, name, marks, async_={"max_retries": 0})
    _enqueue(server, name, {"fail": True})
    _wait(lambda: _dead_letters(server, name), "the dead letter")

    with server.client() as c:
        assert c.delete(f"/v1/functions/{name}").status_code == 204
    management_error(_get(server, f"/v1/functions/{name}/dlq"), 404)
    _deploy(server, name, marks)

    assert _dead_letters(server, name) == []
    assert _summary(server, name)["dead_letters"] == 0


# --- concurrency limits -------------------------------------------------------------------------


def test_throttled_events_wait_in_the_queue_and_are_not_retries(server: HxbServer, marks: Path) -> None:
    name = unique("async-throttled")
    # Reserved concurrency 0: every invocation is throttled until it is raised.
    _deploy(server, name, marks, reserved_concurrency=0)
    ids = [_enqueue(server, name, {"n": n}) for n in range(3)]

    _wait(lambda: _summary(server, name)["statistics"]["throttled"] >= 6, "the events to be throttled")
    assert _runs(marks, name) == []
    assert _summary(server, name)["pending"] == 3
    with server.client() as c:
        patched = c.patch(f"/v1/functions/{name}", json={"reserved_concurrency": 1})
    assert patched.status_code == 200, patched.text

    runs = _wait(lambda: len(_runs(marks, name)) == 3 and _runs(marks, name), "the throttled events to run")
    assert sorted(r[0] for r in runs) == sorted(ids)
    summary = _wait(lambda: (s := _summary(server, name))["pending"] == 0 and s, "the queue to empty")
    assert summary["statistics"]["retried"] == 0
    assert summary["statistics"]["succeeded"] == 3
    assert summary["dead_letters"] == 0


# --- restarts -----------------------------------------------------------------------------------


def _pending_ids(data_dir: Path) -> set[str]:
    """The events the store holds as pending (read while no server runs on the data dir)."""
    with sqlite3.connect(data_dir / "hxb.db") as db:
        return {row[0] for row in db.execute("SELECT id FROM async_events WHERE state = 'pending'")}


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_events_pending_at_a_restart_all_run_and_none_done_runs_twice(
    hxb_server_factory: Any, tmp_path: Path, marks: Path, stop_signal: int
) -> None:
    data_dir = tmp_path / "data"
    # One event at a time and no shutdown grace: the server stops with events waiting and one running.
    env = {**FAST, "HXB_ASYNC_MAX_IN_FLIGHT_PER_FUNCTION": "1", "HXB_ASYNC_SHUTDOWN_GRACE_S": "0"}
    first: HxbServer = hxb_server_factory(data_dir=data_dir, **env)
    name = "slow-events"
    _deploy(first, name, marks)
    ids = [_enqueue(first, name, {"sleep": 0.3, "n": n}) for n in range(8)]
    _wait(lambda: len(_runs(marks, name)) >= 2, "two events to run")

    if stop_signal == signal.SIGKILL:
        os.kill(first.pid, signal.SIGKILL)
        first.kill()
    else:
        assert first.stop(signal.SIGTERM) == 0, "".join(first.output)
    pending = _pending_ids(data_dir)
    done_before = set(ids) - pending
    assert done_before, "no event finished before the stop"
    assert pending, "every event finished before the stop"

    second: HxbServer = hxb_server_factory(data_dir=data_dir, **env)
    _wait(lambda: {r[0] for r in _runs(marks, name)} == set(ids), "every event to run after the restart")
    _wait(lambda: _summary(second, name)["pending"] == 0, "the queue to empty")

    counts = dict.fromkeys(ids, 0)
    for request_id, _ in _runs(marks, name):
        counts[request_id] += 1
    assert all(counts[i] == 1 for i in done_before), counts
    # At least once: an event that was running when the platform stopped may run twice.
    assert all(1 <= counts[i] <= 2 for i in pending), counts
    assert sum(counts.values()) <= len(ids) + 1, counts
    assert _dead_letters(second, name) == []


def test_event_ids_are_the_request_ids_callers_got(server: HxbServer, marks: Path) -> None:
    name = unique("async-ids")
    _deploy(server, name, marks)
    ids = {_enqueue(server, name, {"n": n}) for n in range(5)}

    runs = _wait(lambda: len(_runs(marks, name)) == 5 and _runs(marks, name), "five events to run")

    assert {r[0] for r in runs} == ids
    assert all(uuid.UUID(i) for i in ids)
