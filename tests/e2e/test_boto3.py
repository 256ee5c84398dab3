"""boto3's `lambda` client, unchanged, pointed at a real `hxb serve` with `endpoint_url`: the Invoke
API is Lambda's, so what works against AWS works here (DESIGN §3.2)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.conftest import HxbServer

ECHO = """
def handler(event, context):
    return {"echo": event, "function": context.function_name, "arn": context.invoked_function_arn}
"""

PRINTER = """
def handler(event, context):
    print("said:", event.get("say"))
    return {"said": event.get("say")}
"""

CONTEXT_READER = """
def handler(event, context):
    cc = context.client_context
    if cc is None:
        return None
    return {
        "custom": cc.custom,
        "env": cc.env,
        "app_title": cc.client.app_title if cc.client else None,
    }
"""

RAISER = """
class PaymentDeclined(Exception):
    pass

def handler(event, context):
    raise PaymentDeclined("card " + event["card"] + " declined")
"""

# Lambda's synchronous request payload limit, the one botocore's RequestTooLargeException stands for.
SYNC_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024


def test_invoke_returns_result_when_called_by_name(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-echo"
    hxb_server.deploy(name, {"index.py": ECHO})

    response = lambda_client.invoke(FunctionName=name, Payload=json.dumps({"a": [1, 2], "b": "ü"}))

    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in response
    assert json.loads(response["Payload"].read()) == {
        "echo": {"a": [1, 2], "b": "ü"},
        "function": name,
        "arn": f"arn:hxb:lambda:local:default:function:{name}",
    }


def test_invoke_returns_log_tail_when_log_type_is_tail(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-tail"
    hxb_server.deploy(name, {"index.py": PRINTER})

    response = lambda_client.invoke(FunctionName=name, Payload=json.dumps({"say": "tail-marker"}), LogType="Tail")

    assert response["StatusCode"] == 200
    assert json.loads(response["Payload"].read()) == {"said": "tail-marker"}
    tail = base64.b64decode(response["LogResult"]).decode()
    assert "START RequestId:" in tail
    assert "said: tail-marker" in tail
    assert "REPORT RequestId:" in tail
    assert tail.index("START") < tail.index("said: tail-marker") < tail.index("REPORT")


def test_invoke_omits_log_tail_when_log_type_not_given(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-no-tail"
    hxb_server.deploy(name, {"index.py": PRINTER})

    response = lambda_client.invoke(FunctionName=name, Payload=json.dumps({"say": "quiet"}))

    assert response["StatusCode"] == 200
    assert "LogResult" not in response


def test_invoke_passes_client_context_when_given(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-client-context"
    hxb_server.deploy(name, {"index.py": CONTEXT_READER})
    client_context = {"client": {"app_title": "mobile"}, "custom": {"tenant": "acme"}, "env": {"locale": "fr"}}

    response = lambda_client.invoke(
        FunctionName=name,
        Payload=b"{}",
        ClientContext=base64.b64encode(json.dumps(client_context).encode()).decode(),
    )

    assert response["StatusCode"] == 200
    assert json.loads(response["Payload"].read()) == {
        "custom": {"tenant": "acme"},
        "env": {"locale": "fr"},
        "app_title": "mobile",
    }


def test_invoke_reports_unhandled_error_when_handler_raises(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-raises"
    hxb_server.deploy(name, {"index.py": RAISER})

    response = lambda_client.invoke(FunctionName=name, Payload=json.dumps({"card": "4242"}))

    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    document = json.loads(response["Payload"].read())
    assert document["errorType"] == "PaymentDeclined"
    assert document["errorMessage"] == "card 4242 declined"


def test_invoke_raises_resource_not_found_when_function_unknown(lambda_client: Any) -> None:
    with pytest.raises(lambda_client.exceptions.ResourceNotFoundException) as caught:
        lambda_client.invoke(FunctionName="boto-never-deployed", Payload=b"{}")

    assert "boto-never-deployed" in str(caught.value)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_invoke_raises_request_too_large_when_payload_over_6mb(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-too-large"
    hxb_server.deploy(name, {"index.py": ECHO})
    payload = json.dumps({"blob": "x" * SYNC_PAYLOAD_LIMIT_BYTES}).encode()

    with pytest.raises(lambda_client.exceptions.RequestTooLargeException) as caught:
        lambda_client.invoke(FunctionName=name, Payload=payload)

    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413


def test_invoke_returns_204_without_running_when_dry_run(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-dry-run"
    hxb_server.deploy(name, {"index.py": PRINTER})

    response = lambda_client.invoke(FunctionName=name, InvocationType="DryRun", Payload=json.dumps({"say": "dry"}))

    # A real invocation after it: once its output is in the log, a dry run's would be there too.
    assert hxb_server.invoke(name, {"say": "real"}).status_code == 200
    events = hxb_server.wait_for_log(name, "said: real")

    assert response["StatusCode"] == 204
    assert response["Payload"].read() == b""
    assert not any("said: dry" in e["message"] for e in events), [e["message"] for e in events]


def test_invoke_raises_resource_not_found_when_dry_run_of_unknown_function(lambda_client: Any) -> None:
    with pytest.raises(lambda_client.exceptions.ResourceNotFoundException):
        lambda_client.invoke(FunctionName="boto-dry-never-deployed", InvocationType="DryRun")


@pytest.mark.parametrize(
    ("case", "function_name", "qualifier"),
    [
        ("arn", "arn:hxb:lambda:local:default:function:{name}", None),
        ("arn-qualifier", "arn:hxb:lambda:local:default:function:{name}", "$LATEST"),
        ("name-qualifier", "{name}", "$LATEST"),
        ("qualified-arn", "arn:hxb:lambda:local:default:function:{name}:$LATEST", None),
    ],
)
def test_invoke_accepts_arn_and_qualifier_when_they_name_latest(
    hxb_server: HxbServer, lambda_client: Any, case: str, function_name: str, qualifier: str | None
) -> None:
    name = f"boto-{case}"
    hxb_server.deploy(name, {"index.py": ECHO})
    kwargs: dict[str, Any] = {"FunctionName": function_name.format(name=name), "Payload": b'{"via": "arn"}'}
    if qualifier is not None:
        kwargs["Qualifier"] = qualifier

    response = lambda_client.invoke(**kwargs)

    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    result = json.loads(response["Payload"].read())
    assert result["echo"] == {"via": "arn"}
    assert result["function"] == name
    # As in Lambda, the invoked ARN carries the qualifier when the caller gave one.
    qualified = qualifier is not None or function_name.endswith(":$LATEST")
    assert result["arn"] == f"arn:hxb:lambda:local:default:function:{name}" + (":$LATEST" if qualified else "")


def test_invoke_event_returns_202_and_runs_the_function_later(hxb_server: HxbServer, lambda_client: Any) -> None:
    name = "boto-event"
    hxb_server.deploy(name, {"index.py": PRINTER})

    response = lambda_client.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"say": "queued-hello"}')

    assert response["StatusCode"] == 202
    assert response["Payload"].read() == b""
    request_id = response["ResponseMetadata"]["RequestId"]
    events = hxb_server.wait_for_log(name, "said: queued-hello", timeout_s=20)
    assert any(e["invocation_id"] == request_id for e in events if "said: queued-hello" in e["message"])
