"""Helpers shared by the HTTP-surface integration tests (invoke API, HTTP trigger, management
API, logs): unique names, a canary function that proves the server still serves, and small
decoders for Lambda's wire formats."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Any

import httpx

from tests.conftest import INSTANCE_ID, HxbServer, instance_pids, wait_instance_gone

MIB = 1024 * 1024
# Lambda's limit for a synchronous request or response payload.
PAYLOAD_LIMIT_BYTES = 6 * MIB

CANARY_HANDLER = f"""
import os
def handler(event, context):
    return {{"canary": event.get("token"), "instance": {INSTANCE_ID}}}
"""


def unique(prefix: str) -> str:
    """A function name no other test uses (the module's server is shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def deploy_canary(server: HxbServer) -> str:
    name = unique("canary")
    server.deploy(name, {"index.py": CANARY_HANDLER})
    assert_canary_ok(server, name)
    return name


def assert_canary_ok(server: HxbServer, name: str) -> None:
    """A healthy function on the same server still answers correctly."""
    token = uuid.uuid4().hex
    response = server.invoke(name, {"token": token})
    assert response.status_code == 200, response.text
    assert "x-amz-function-error" not in response.headers, response.text
    assert response.json()["canary"] == token


def function_error(response: httpx.Response) -> dict[str, Any]:
    """The error document of an invocation that failed as a function error (Lambda's 200 +
    X-Amz-Function-Error)."""
    assert response.status_code == 200, response.text
    assert response.headers.get("x-amz-function-error") == "Unhandled", response.headers
    doc: dict[str, Any] = response.json()
    return doc


def api_error(response: httpx.Response, status: int, code: str) -> str:
    """The message of a Lambda API error with this status and `x-amzn-ErrorType`."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("x-amzn-errortype") == code, response.headers
    message: str = response.json()["message"]
    return message


def management_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of a management API (`/v1`) error with this status."""
    assert response.status_code == status, (response.status_code, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str), error
    assert error["message"], error
    return error


def client_context_header(document: Any) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def decode_log_result(response: httpx.Response) -> str:
    raw = response.headers["x-amz-log-result"]
    return base64.b64decode(raw, validate=True).decode("utf-8")


def instance_running(instance_id: str) -> bool:
    """Whether any process of the instance is alive (zombies count as gone: they run nothing)."""
    return bool(instance_pids(instance_id))


def wait_for_instance_exit(instance_id: str, timeout_s: float = 10.0) -> None:
    """Polls until the instance's processes have exited (a retired one gets SIGTERM and a grace period)."""
    alive = wait_instance_gone(instance_id, timeout_s)
    if alive:
        raise AssertionError(f"instance {instance_id} still runs {timeout_s} s later: pids {alive}")


def files_named(root: str | os.PathLike[str], name: str) -> list[str]:
    """Every path under `root` (symlinks included, not followed) whose last component is `name`."""
    found = []
    for directory, dirs, files in os.walk(root):
        found += [os.path.join(directory, n) for n in (*dirs, *files) if n == name]
    return found


def wait_for_log_event(server: HxbServer, name: str, needle: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Like `HxbServer.wait_for_log`, for logs longer than one page: follows the logs API with
    `after_id`, so each event is fetched once. Returns the first event whose message has `needle`."""
    deadline = time.monotonic() + timeout_s
    after_id = 0
    with server.client() as c:
        while True:
            response = c.get(f"/v1/functions/{name}/logs", params={"after_id": after_id, "limit": 10000})
            assert response.status_code == 200, response.text
            page = response.json()
            for event in page["events"]:
                if needle in event["message"]:
                    found: dict[str, Any] = event
                    return found
            if page["events"]:
                after_id = page["next_after_id"]
                continue
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the logs of {name} after {timeout_s} s")
            time.sleep(0.1)
