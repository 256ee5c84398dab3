"""The Python runtime: every CPython the host offers, sync and async handlers, init once per
instance, Lambda's init error types, and the context and environment of DESIGN §3.4."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from tests.conftest import HxbServer

# Python 3.7 syntax: this runs on every runtime the host has.
VERSION_REPORT = """
import sys
def handler(event, context):
    return {"version": list(sys.version_info[:2]), "executable": sys.executable}
"""


def _runtimes(server: HxbServer) -> list[str]:
    with server.client() as c:
        return [r["name"] for r in c.get("/v1/runtimes").json()["runtimes"]]


def test_every_host_python_is_a_runtime_that_runs_functions(hxb_server: HxbServer) -> None:
    runtimes = _runtimes(hxb_server)
    assert "python3.11" in runtimes
    for runtime in runtimes:
        name = "ver-" + runtime.replace(".", "-")
        hxb_server.deploy(name, {"index.py": VERSION_REPORT}, runtime=runtime)
        response = hxb_server.invoke(name)
        assert response.status_code == 200, response.text
        assert "x-amz-function-error" not in response.headers, (runtime, response.text)
        minor = int(runtime.split(".")[1])
        assert response.json()["version"] == [3, minor]


def test_module_level_code_runs_once_per_instance(hxb_server: HxbServer) -> None:
    hxb_server.deploy(
        "counter",
        {
            "index.py": """
                import os
                INITS = []
                INITS.append(1)
                calls = 0
                def handler(event, context):
                    global calls
                    calls += 1
                    return {"inits": len(INITS), "calls": calls, "instance": os.environ["AWS_LAMBDA_LOG_STREAM_NAME"]}
            """
        },
    )
    results = [hxb_server.invoke("counter").json() for _ in range(5)]
    assert [r["calls"] for r in results] == [1, 2, 3, 4, 5]
    assert {r["inits"] for r in results} == {1}
    assert len({r["instance"] for r in results}) == 1


def test_async_def_handler_keeps_its_event_loop_between_invocations(hxb_server: HxbServer) -> None:
    hxb_server.deploy(
        "asyncfn",
        {
            "index.py": """
                import asyncio
                LOOPS = set()
                async def handler(event, context):
                    await asyncio.sleep(0.01)
                    LOOPS.add(id(asyncio.get_running_loop()))
                    return {"loops": len(LOOPS), "echo": event}
            """
        },
    )
    first = hxb_server.invoke("asyncfn", {"n": 1}).json()
    second = hxb_server.invoke("asyncfn", {"n": 2}).json()
    assert first == {"loops": 1, "echo": {"n": 1}}
    assert second == {"loops": 1, "echo": {"n": 2}}


def test_handler_in_a_package_with_a_dotted_module_path(hxb_server: HxbServer) -> None:
    hxb_server.deploy(
        "nested",
        {
            "app/__init__.py": "",
            "app/api/__init__.py": "",
            "app/api/main.py": "from app.helpers import double\ndef run(event, context):\n    return double(event['x'])\n",  # noqa: E501
            "app/helpers.py": "def double(x):\n    return 2 * x\n",
        },
        handler="app.api.main.run",
    )
    assert hxb_server.invoke("nested", {"x": 21}).json() == 42


@pytest.mark.parametrize(
    ("files", "handler", "error_type", "words"),
    [
        (
            {"index.py": "import not_a_module_anywhere\n"},
            "index.handler",
            "Runtime.ImportModuleError",
            "Unable to import module 'index': No module named 'not_a_module_anywhere'",
        ),
        (
            {"index.py": "def other(e, c):\n    return 1\n"},
            "index.handler",
            "Runtime.HandlerNotFound",
            "Handler 'handler' missing on module 'index'",
        ),
        ({"other.py": "x = 1\n"}, "index.handler", "Runtime.ImportModuleError", "Unable to import module 'index'"),
        (
            {"index.py": "def handler(e, c)\n    return 1\n"},
            "index.handler",
            "Runtime.UserCodeSyntaxError",
            "Syntax error in module 'index'",
        ),
        (
            {"index.py": "raise ValueError('bad config at import')\n"},
            "index.handler",
            "ValueError",
            "bad config at import",
        ),
    ],
    ids=["missing-import", "missing-handler", "missing-module", "syntax-error", "raises-at-import"],
)
def test_init_errors_are_reported_with_lambdas_error_types(
    hxb_server: HxbServer, files: dict[str, str], handler: str, error_type: str, words: str
) -> None:
    name = "init-" + error_type.lower().replace(".", "-") + f"-{abs(hash(words)) % 10_000}"
    hxb_server.deploy(name, files, handler=handler)

    response = hxb_server.invoke(name, headers={"X-Amz-Log-Type": "Tail"})

    assert response.status_code == 200
    assert response.headers["x-amz-function-error"] == "Unhandled"
    body = response.json()
    assert body["errorType"] == error_type
    assert words in body["errorMessage"]
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode()
    assert error_type in tail
    # The platform keeps serving: the next call fails the same way, it does not hang or crash.
    assert hxb_server.invoke(name).json()["errorType"] == error_type


CONTEXT_AND_ENV = """
import os, time
def handler(event, context):
    first = context.get_remaining_time_in_millis()
    time.sleep(0.3)
    second = context.get_remaining_time_in_millis()
    names = ["HXB_FUNCTION_NAME", "HXB_FUNCTION_VERSION", "HXB_WORKSPACE", "HXB_REGION", "HXB_MEMORY_SIZE",
             "HXB_TIMEOUT", "HXB_LOG_LEVEL", "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION",
             "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_REGION", "AWS_LAMBDA_LOG_GROUP_NAME",
             "AWS_LAMBDA_LOG_STREAM_NAME", "LAMBDA_TASK_ROOT", "_HANDLER", "MY_SETTING"]
    return {
        "env": {n: os.environ.get(n) for n in names},
        "cwd": os.getcwd(),
        "context": {
            "aws_request_id": context.aws_request_id,
            "request_id": context.request_id,
            "requestId": context.requestId,
            "function_name": context.function_name,
            "function_version": context.function_version,
            "invoked_function_arn": context.invoked_function_arn,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "log_group_name": context.log_group_name,
            "log_stream_name": context.log_stream_name,
            "logStreamName": context.logStreamName,
            "identity_id": context.identity.cognito_identity_id,
            "custom": context.client_context.custom if context.client_context else None,
        },
        "remaining": [first, second],
    }
"""


def test_context_and_environment_match_the_contract(hxb_server: HxbServer) -> None:
    hxb_server.deploy(
        "ctx",
        {"index.py": CONTEXT_AND_ENV},
        memory=256,
        timeout=5,
        log_level="debug",
        environment={"MY_SETTING": "on"},
    )
    client_context = base64.b64encode(json.dumps({"custom": {"tenant": "t1"}}).encode()).decode()

    started = time.monotonic()
    response = hxb_server.invoke("ctx", headers={"X-Amz-Client-Context": client_context})
    elapsed_ms = (time.monotonic() - started) * 1000

    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    request_id = response.headers["x-amzn-requestid"]
    env, ctx = result["env"], result["context"]
    assert env["HXB_FUNCTION_NAME"] == env["AWS_LAMBDA_FUNCTION_NAME"] == "ctx"
    assert env["HXB_FUNCTION_VERSION"] == env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["HXB_WORKSPACE"] == "default"
    assert env["HXB_REGION"] == env["AWS_REGION"] == "local"
    assert env["HXB_MEMORY_SIZE"] == env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["HXB_TIMEOUT"] == "5"
    assert env["HXB_LOG_LEVEL"] == "DEBUG"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/hxb/functions/default/ctx"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"].split("/")[3].startswith("[$LATEST]")
    assert env["_HANDLER"] == "index.handler"
    assert env["MY_SETTING"] == "on"
    assert result["cwd"] == env["LAMBDA_TASK_ROOT"]
    assert ctx["aws_request_id"] == ctx["request_id"] == ctx["requestId"] == request_id
    assert ctx["function_name"] == "ctx"
    assert ctx["function_version"] == "$LATEST"
    assert ctx["invoked_function_arn"] == "arn:hxb:lambda:local:default:function:ctx"
    assert ctx["memory_limit_in_mb"] == "256"
    assert ctx["log_group_name"] == env["AWS_LAMBDA_LOG_GROUP_NAME"]
    assert ctx["log_stream_name"] == ctx["logStreamName"] == env["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert ctx["custom"] == {"tenant": "t1"}
    first, second = result["remaining"]
    # Counting down to the real deadline: at most the 5 s timeout, and 0.3 s less after sleeping.
    assert 5000 - elapsed_ms - 50 <= first <= 5000
    assert 250 <= first - second <= 1000
