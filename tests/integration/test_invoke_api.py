"""The Lambda Invoke API (`POST /2015-03-31/functions/{name}/invocations`) against a real
`hxb serve`: status codes, headers and error documents as Lambda has them, and every way a
function can fail leaving the platform (and the other functions on it) serving."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import INSTANCE_ID, HxbServer
from tests.integration._helpers import (
    MIB,
    PAYLOAD_LIMIT_BYTES,
    api_error,
    assert_canary_ok,
    client_context_header,
    decode_log_result,
    deploy_canary,
    function_error,
    unique,
    wait_for_instance_exit,
    wait_for_log_event,
)

ECHO = f"""
import os
def handler(event, context):
    return {{
        "event": event,
        "request_id": context.aws_request_id,
        "arn": context.invoked_function_arn,
        "instance": {INSTANCE_ID},
    }}
"""

# Raises from a helper in another user module, so the stack has user frames in two files.
RAISES_INDEX = """
import helpers
def handler(event, context):
    return helpers.explode(event["code"])
"""
RAISES_HELPERS = """
def explode(code):
    raise ValueError(f"boom {code}")
"""

# Counts its invocations, returns its instance, and misbehaves as the event asks.
COUNTER = (
    """
import os, sys, time
COUNT = 0
INSTANCE = """
    + INSTANCE_ID
    + """
def handler(event, context):
    global COUNT
    COUNT += 1
    action = event.get("action")
    if action == "hang":
        while True:
            time.sleep(0.05)
    if action == "sys_exit":
        sys.exit(3)
    if action == "os_exit":
        os._exit(7)
    if action == "segfault":
        import ctypes
        ctypes.string_at(0)
    return {"count": COUNT, "instance": INSTANCE}
"""
)


@pytest.fixture(scope="module")
def canary(hxb_server: HxbServer) -> str:
    return deploy_canary(hxb_server)


@pytest.fixture(scope="module")
def echo(hxb_server: HxbServer) -> str:
    name = unique("echo")
    hxb_server.deploy(name, {"index.py": ECHO})
    return name


def _post(server: HxbServer, path: str, body: bytes = b"{}", **headers: str) -> httpx.Response:
    with server.client() as c:
        return c.post(path, content=body, headers=headers)


# --- success ------------------------------------------------------------------------------------


def test_request_response_returns_the_handlers_json(hxb_server: HxbServer, echo: str) -> None:
    response = hxb_server.invoke(echo, {"a": [1, 2, {"b": None}], "s": "héllo"})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-amz-executed-version"] == "$LATEST"
    assert "x-amz-function-error" not in response.headers
    body = response.json()
    assert body["event"] == {"a": [1, 2, {"b": None}], "s": "héllo"}
    assert body["request_id"] == response.headers["x-amzn-requestid"]


def test_empty_body_gives_the_handler_an_empty_object(hxb_server: HxbServer, echo: str) -> None:
    response = hxb_server.invoke(echo, raw=b"")

    assert response.status_code == 200, response.text
    assert response.json()["event"] == {}


def test_payload_just_under_the_limit_is_accepted(hxb_server: HxbServer) -> None:
    name = unique("length")
    hxb_server.deploy(name, {"index.py": "def handler(event, context):\n    return len(event)\n"})
    payload = b'"' + b"x" * (PAYLOAD_LIMIT_BYTES - 1024) + b'"'

    response = hxb_server.invoke(name, raw=payload)

    assert response.status_code == 200, response.text
    assert response.json() == PAYLOAD_LIMIT_BYTES - 1024


def test_async_handler_runs_and_module_code_runs_once(hxb_server: HxbServer) -> None:
    name = unique("async")
    hxb_server.deploy(
        name,
        {
            "index.py": """
            import asyncio
            INITS = 0
            INITS += 1
            CALLS = 0
            async def handler(event, context):
                global CALLS
                await asyncio.sleep(0.001)
                CALLS += 1
                return {"inits": INITS, "calls": CALLS, "echo": event}
            """
        },
    )

    results = [hxb_server.invoke(name, {"n": n}) for n in range(3)]

    assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
    assert [r.json() for r in results] == [{"inits": 1, "calls": n + 1, "echo": {"n": n}} for n in range(3)]


# --- function errors ----------------------------------------------------------------------------


def test_handler_exception_is_an_unhandled_function_error(hxb_server: HxbServer, canary: str) -> None:
    name = unique("raises")
    hxb_server.deploy(name, {"index.py": RAISES_INDEX, "helpers.py": RAISES_HELPERS})

    response = hxb_server.invoke(name, {"code": 42})

    doc = function_error(response)
    assert response.headers["x-amz-executed-version"] == "$LATEST"
    assert doc["errorType"] == "ValueError"
    assert doc["errorMessage"] == "boom 42"
    assert isinstance(doc["stackTrace"], list), doc
    assert doc["stackTrace"], doc
    trace = "".join(doc["stackTrace"])
    assert "index.py" in trace, trace
    assert "helpers.py" in trace, trace
    assert 'raise ValueError(f"boom {code}")' in trace
    assert "_hxb_bootstrap" not in trace
    assert_canary_ok(hxb_server, canary)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [("{1, 2}", "set"), ("object()", "object")],
)
def test_non_json_result_is_a_marshal_error(hxb_server: HxbServer, canary: str, value: str, type_name: str) -> None:
    name = unique("marshal")
    hxb_server.deploy(
        name,
        {"index.py": f"def handler(event, context):\n    return {value} if event.get('bad') else 'fine'\n"},
    )

    doc = function_error(hxb_server.invoke(name, {"bad": True}))
    after = hxb_server.invoke(name, {})

    assert doc["errorType"] == "Runtime.MarshalError"
    assert type_name in doc["errorMessage"], doc
    assert after.status_code == 200, after.text
    assert "x-amz-function-error" not in after.headers, after.text
    assert after.json() == "fine"
    assert_canary_ok(hxb_server, canary)


def test_response_over_6mb_is_an_error_not_a_truncated_body(hxb_server: HxbServer, canary: str) -> None:
    name = unique("bigresult")
    hxb_server.deploy(
        name,
        {
            "index.py": f"""
            def handler(event, context):
                return "x" * {PAYLOAD_LIMIT_BYTES} if event.get("big") else "ok"
            """
        },
    )

    response = hxb_server.invoke(name, {"big": True})
    after = hxb_server.invoke(name, {})

    doc = function_error(response)
    assert len(response.content) < 64 * 1024
    assert doc["errorType"] == "Function.ResponseSizeTooLarge"
    assert str(PAYLOAD_LIMIT_BYTES) in doc["errorMessage"], doc
    assert after.status_code == 200, after.text
    assert after.json() == "ok"
    assert_canary_ok(hxb_server, canary)


def test_response_just_under_6mb_is_returned_whole(hxb_server: HxbServer) -> None:
    name = unique("bigok")
    size = PAYLOAD_LIMIT_BYTES - 1024
    hxb_server.deploy(
        name,
        {
            "index.py": f"""
            import string
            def handler(event, context):
                # Cheap to build: at 128 MB a function gets 7% of a CPU, as in Lambda.
                text = string.ascii_lowercase * ({size} // 26 + 1)
                return text[:{size}]
            """
        },
    )

    response = hxb_server.invoke(name, {})

    assert response.status_code == 200, response.text
    assert "x-amz-function-error" not in response.headers
    assert int(response.headers["content-length"]) == size + 2
    assert response.json() == "".join(chr(97 + i % 26) for i in range(size))


def test_response_over_6mb_sent_past_the_runtime_is_refused_by_the_platform(hxb_server: HxbServer, canary: str) -> None:
    # The guest is not trusted: code that writes its own RESULT frame on the runtime's channel
    # (fd 3) must not get more than 6 MB through either.
    name = unique("forged")
    hxb_server.deploy(
        name,
        {
            "index.py": f"""
            import os, socket, struct
            def handler(event, context):
                if event.get("forge"):
                    sock = socket.socket(fileno=os.dup(3))
                    rid = context.aws_request_id.encode()
                    size = {PAYLOAD_LIMIT_BYTES + MIB}
                    sock.sendall(struct.pack("<BII", 12, len(rid), size) + rid + b"x" * size)
                return "ok"
            """
        },
    )

    response = hxb_server.invoke(name, {"forge": True})
    after = hxb_server.invoke(name, {})

    doc = function_error(response)
    assert len(response.content) < 64 * 1024
    assert doc["errorType"] == "Function.ResponseSizeTooLarge"
    assert after.status_code == 200, after.text
    assert after.json() == "ok"
    assert_canary_ok(hxb_server, canary)


def test_timed_out_instance_is_killed_and_next_invocation_gets_a_new_one(hxb_server: HxbServer, canary: str) -> None:
    name = unique("timeout")
    hxb_server.deploy(name, {"index.py": COUNTER}, timeout=1)
    first = hxb_server.invoke(name, {})
    assert first.status_code == 200, first.text
    old = first.json()["instance"]

    doc = function_error(hxb_server.invoke(name, {"action": "hang"}))
    after = hxb_server.invoke(name, {})

    assert doc["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in doc["errorMessage"]
    wait_for_instance_exit(old)
    assert after.status_code == 200, after.text
    assert "x-amz-function-error" not in after.headers, after.text
    assert after.json()["count"] == 1, "the next invocation must run on a fresh instance"
    assert after.json()["instance"] != old
    assert_canary_ok(hxb_server, canary)


@pytest.mark.parametrize(
    ("action", "description"),
    [
        ("sys_exit", "exit status 3"),
        ("os_exit", "exit status 7"),
        ("segfault", "signal: segmentation fault"),
    ],
)
def test_runtime_that_exits_is_an_exit_error_and_the_function_recovers(
    hxb_server: HxbServer, canary: str, action: str, description: str
) -> None:
    name = unique(action.replace("_", ""))
    hxb_server.deploy(name, {"index.py": COUNTER})
    old = hxb_server.invoke(name, {}).json()["instance"]

    doc = function_error(hxb_server.invoke(name, {"action": action}))
    after = hxb_server.invoke(name, {})

    assert doc["errorType"] == "Runtime.ExitError"
    assert description in doc["errorMessage"], doc
    wait_for_instance_exit(old)
    assert after.status_code == 200, after.text
    assert "x-amz-function-error" not in after.headers, after.text
    assert after.json()["count"] == 1
    assert_canary_ok(hxb_server, canary)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("sys.stdout.write(('y' * 1023 + '\\n') * 10240)", id="10k-lines"),
        pytest.param("sys.stdout.write('y' * (10 * 1024 * 1024))", id="one-10mb-line"),
    ],
)
def test_ten_megabytes_of_output_in_one_invocation_is_served_and_logged(
    hxb_server: HxbServer, canary: str, shape: str
) -> None:
    name = unique("chatty")
    token = uuid.uuid4().hex
    hxb_server.deploy(
        name,
        {
            "index.py": f"""
            import sys
            def handler(event, context):
                {shape}
                print("last line {token}")
                return "printed"
            """
        },
    )

    response = hxb_server.invoke(name, {})

    assert response.status_code == 200, response.text
    assert "x-amz-function-error" not in response.headers
    assert response.json() == "printed"
    assert_canary_ok(hxb_server, canary)
    # Over 10 000 events, more than one page of the logs API: follow it with after_id.
    event = wait_for_log_event(hxb_server, name, f"last line {token}", timeout_s=30)
    assert event["message"].endswith(f"last line {token}")
    assert event["invocation_id"] == response.headers["x-amzn-requestid"]


# --- request errors -----------------------------------------------------------------------------


def test_unknown_function_is_resource_not_found(hxb_server: HxbServer) -> None:
    name = unique("nosuch")

    message = api_error(hxb_server.invoke(name, {}), 404, "ResourceNotFoundException")

    assert name in message


def test_request_payload_over_6mb_is_request_too_large(hxb_server: HxbServer, echo: str, canary: str) -> None:
    payload = b'"' + b"x" * PAYLOAD_LIMIT_BYTES + b'"'

    message = api_error(hxb_server.invoke(echo, raw=payload), 413, "RequestTooLargeException")

    assert str(PAYLOAD_LIMIT_BYTES) in message
    assert_canary_ok(hxb_server, canary)


def test_streamed_payload_over_6mb_is_request_too_large(hxb_server: HxbServer, echo: str, canary: str) -> None:
    # Chunked: no Content-Length to refuse up front, the limit holds while reading.
    def chunks() -> Iterator[bytes]:
        yield b'"'
        for _ in range(PAYLOAD_LIMIT_BYTES // MIB):
            yield b"x" * MIB
        yield b'x"'

    with hxb_server.client() as c:
        response = c.post(f"/2015-03-31/functions/{echo}/invocations", content=chunks())

    api_error(response, 413, "RequestTooLargeException")
    assert_canary_ok(hxb_server, canary)


def test_invalid_json_body_is_invalid_request_content(hxb_server: HxbServer, echo: str) -> None:
    response = hxb_server.invoke(echo, raw=b'{"a": ')

    api_error(response, 400, "InvalidRequestContentException")


def test_event_invocation_type_is_accepted_with_202(hxb_server: HxbServer, echo: str) -> None:
    # The queue's behaviour (retries, destinations, restarts) is tested in test_async.py.
    response = hxb_server.invoke(echo, {}, headers={"X-Amz-Invocation-Type": "Event"})

    assert response.status_code == 202, response.text
    assert response.content == b""
    assert response.headers["x-amzn-requestid"]


def test_dry_run_returns_204_without_running_the_handler(hxb_server: HxbServer) -> None:
    name = unique("dryrun")
    hxb_server.deploy(name, {"index.py": "def handler(event, context):\n    print('ran', event['marker'])\n"})
    dry_marker, real_marker = uuid.uuid4().hex, uuid.uuid4().hex

    dry = hxb_server.invoke(name, {"marker": dry_marker}, headers={"X-Amz-Invocation-Type": "DryRun"})
    real = hxb_server.invoke(name, {"marker": real_marker})

    assert dry.status_code == 204, dry.text
    assert dry.content == b""
    assert real.status_code == 200, real.text
    # Logs are written in order: once the real run's line is there, the dry run's would be too.
    events = hxb_server.wait_for_log(name, f"ran {real_marker}")
    messages = [e["message"] for e in events]
    assert not any(dry_marker in m for m in messages), messages
    assert not any(dry.headers["x-amzn-requestid"] in m for m in messages), messages


def test_dry_run_of_an_unknown_function_is_resource_not_found(hxb_server: HxbServer) -> None:
    name = unique("nosuch")

    response = hxb_server.invoke(name, {}, headers={"X-Amz-Invocation-Type": "DryRun"})

    assert name in api_error(response, 404, "ResourceNotFoundException")


def test_log_type_tail_returns_the_end_of_the_invocations_log(hxb_server: HxbServer) -> None:
    name = unique("tail")
    token = uuid.uuid4().hex
    hxb_server.deploy(name, {"index.py": f"def handler(event, context):\n    print('hello {token}')\n"})

    response = hxb_server.invoke(name, {}, headers={"X-Amz-Log-Type": "Tail"})

    assert response.status_code == 200, response.text
    tail = decode_log_result(response)
    request_id = response.headers["x-amzn-requestid"]
    lines = tail.splitlines()
    assert lines[0] == f"START RequestId: {request_id} Version: $LATEST", tail
    assert f"hello {token}" in lines
    assert f"END RequestId: {request_id}" in lines
    assert lines[-1].startswith(f"REPORT RequestId: {request_id}\t"), tail


def test_log_type_tail_is_cut_to_the_last_4kb(hxb_server: HxbServer) -> None:
    name = unique("longtail")
    hxb_server.deploy(
        name,
        {
            "index.py": """
            def handler(event, context):
                for i in range(200):
                    print(f"line {i:04d} " + "z" * 90)
            """
        },
    )

    response = hxb_server.invoke(name, {}, headers={"X-Amz-Log-Type": "Tail"})

    assert response.status_code == 200, response.text
    tail = decode_log_result(response)
    assert 4096 - 200 <= len(tail.encode()) <= 4096, len(tail.encode())
    assert "line 0199 " in tail
    assert "line 0000 " not in tail
    assert "START RequestId" not in tail
    assert tail.rstrip("\n").splitlines()[-1].startswith("REPORT RequestId: ")


def test_log_type_tail_of_a_failed_invocation_says_why(hxb_server: HxbServer) -> None:
    name = unique("tailfail")
    hxb_server.deploy(name, {"index.py": RAISES_INDEX, "helpers.py": RAISES_HELPERS})

    response = hxb_server.invoke(name, {"code": 7}, headers={"X-Amz-Log-Type": "Tail"})

    function_error(response)
    tail = decode_log_result(response)
    assert "[ERROR] ValueError: boom 7" in tail, tail
    assert "helpers.py" in tail
    assert tail.rstrip("\n").splitlines()[-1].startswith("REPORT RequestId: ")


def test_log_type_tail_of_a_timed_out_invocation_says_so(hxb_server: HxbServer) -> None:
    name = unique("tailtimeout")
    hxb_server.deploy(name, {"index.py": COUNTER}, timeout=1)

    response = hxb_server.invoke(name, {"action": "hang"}, headers={"X-Amz-Log-Type": "Tail"})

    function_error(response)
    tail = decode_log_result(response)
    request_id = response.headers["x-amzn-requestid"]
    assert f"{request_id} Task timed out after 1.00 seconds" in tail, tail
    assert f"END RequestId: {request_id}" in tail


@pytest.mark.parametrize("log_type", ["Bogus", "tail"])
def test_unknown_log_type_is_a_400(hxb_server: HxbServer, echo: str, log_type: str) -> None:
    response = hxb_server.invoke(echo, {}, headers={"X-Amz-Log-Type": log_type})

    assert response.status_code == 400, response.text
    assert "X-Amz-Log-Type" in response.json()["message"]


def test_no_log_result_without_log_type_tail(hxb_server: HxbServer, echo: str) -> None:
    response = hxb_server.invoke(echo, {})

    assert response.status_code == 200
    assert "x-amz-log-result" not in response.headers


def test_client_context_reaches_the_handler(hxb_server: HxbServer) -> None:
    name = unique("clientctx")
    hxb_server.deploy(
        name,
        {
            "index.py": """
            def handler(event, context):
                cc = context.client_context
                return {
                    "custom": cc.custom,
                    "env": cc.env,
                    "installation_id": cc.client.installation_id,
                    "app_title": cc.client.app_title,
                }
            """
        },
    )
    document = {
        "custom": {"tenant": "acme", "n": 3},
        "env": {"platform": "linux"},
        "client": {"installation_id": "inst-1", "app_title": "hxb tests"},
    }

    response = hxb_server.invoke(name, {}, headers={"X-Amz-Client-Context": client_context_header(document)})

    assert response.status_code == 200, response.text
    assert response.json() == {
        "custom": {"tenant": "acme", "n": 3},
        "env": {"platform": "linux"},
        "installation_id": "inst-1",
        "app_title": "hxb tests",
    }


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("not base64 at all!", id="not-base64"),
        pytest.param("bm90IGpzb24=", id="not-json"),
        pytest.param(client_context_header([1, 2]), id="not-an-object"),
    ],
)
def test_invalid_client_context_is_a_400(hxb_server: HxbServer, echo: str, header: str) -> None:
    response = hxb_server.invoke(echo, {}, headers={"X-Amz-Client-Context": header})

    assert response.status_code == 400, response.text
    assert "Client-Context" in response.json()["message"]


def test_client_context_over_lambdas_limit_is_a_400(hxb_server: HxbServer, echo: str) -> None:
    header = client_context_header({"custom": {"blob": "b" * 3600}})

    response = hxb_server.invoke(echo, {}, headers={"X-Amz-Client-Context": header})

    assert response.status_code == 400, response.text
    assert "3583" in response.json()["message"]


@pytest.mark.parametrize(
    "payload",
    [pytest.param(b"[1, 2]", id="list"), pytest.param(b'"text"', id="string"), pytest.param(b"null", id="null")],
)
def test_any_json_value_is_a_valid_event(hxb_server: HxbServer, echo: str, payload: bytes) -> None:
    response = hxb_server.invoke(echo, raw=payload)

    assert response.status_code == 200, response.text
    assert response.json()["event"] == json.loads(payload)


# --- names, ARNs and qualifiers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path_name", "query", "arn_suffix"),
    [
        pytest.param("{name}", "", "", id="name"),
        pytest.param("arn:hxb:lambda:local:default:function:{name}", "", "", id="arn"),
        pytest.param("{name}", "?Qualifier=$LATEST", ":$LATEST", id="qualifier-param"),
        pytest.param("{name}:$LATEST", "", ":$LATEST", id="qualified-name"),
        pytest.param("arn:hxb:lambda:local:default:function:{name}:$LATEST", "", ":$LATEST", id="qualified-arn"),
        pytest.param(
            "arn%3Ahxb%3Alambda%3Alocal%3Adefault%3Afunction%3A{name}", "?Qualifier=%24LATEST", ":$LATEST", id="encoded"
        ),
    ],
)
def test_function_named_by_name_or_arn_and_latest_qualifier_is_invoked(
    hxb_server: HxbServer, echo: str, path_name: str, query: str, arn_suffix: str
) -> None:
    response = _post(hxb_server, f"/2015-03-31/functions/{path_name.format(name=echo)}/invocations{query}")

    assert response.status_code == 200, response.text
    assert response.headers["x-amz-executed-version"] == "$LATEST"
    assert response.json()["arn"] == f"arn:hxb:lambda:local:default:function:{echo}{arn_suffix}"


@pytest.mark.parametrize(
    ("path_name", "query"),
    [
        pytest.param("{name}", "?Qualifier=1", id="version-param"),
        pytest.param("{name}", "?Qualifier=prod", id="alias-param"),
        pytest.param("{name}:2", "", id="qualified-name"),
        pytest.param("arn:hxb:lambda:local:default:function:{name}:prod", "", id="qualified-arn"),
        pytest.param("arn:hxb:lambda:local:other:function:{name}", "", id="other-workspace"),
    ],
)
def test_other_qualifiers_are_resource_not_found(hxb_server: HxbServer, echo: str, path_name: str, query: str) -> None:
    response = _post(hxb_server, f"/2015-03-31/functions/{path_name.format(name=echo)}/invocations{query}")

    message = api_error(response, 404, "ResourceNotFoundException")
    assert echo in message


def test_error_documents_are_json(hxb_server: HxbServer) -> None:
    response = hxb_server.invoke(unique("nosuch"), {})

    assert response.headers["content-type"] == "application/json"
    assert set(json.loads(response.content)) >= {"message", "Type"}
