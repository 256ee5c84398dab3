"""The HTTP trigger (`ANY /fn/{name}[/{path}]`) against a real `hxb serve`: the request arrives
as an API Gateway HTTP API payload 2.0 event, and the handler's result becomes the response."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from tests.conftest import HxbServer
from tests.integration._helpers import PAYLOAD_LIMIT_BYTES, assert_canary_ok, deploy_canary, unique

# Returns the event it got, so the test can look at it (a plain dict: 200 application/json).
ECHO_EVENT = """
def handler(event, context):
    return {"event": event, "request_id": context.aws_request_id}
"""

# Returns the request body as it arrived, as a base64 response: bytes in == bytes out.
MIRROR_BODY = """
import base64
def handler(event, context):
    body = event.get("body") or ""
    raw = base64.b64decode(body) if event["isBase64Encoded"] else body.encode("utf-8")
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/octet-stream", "x-was-base64": str(event["isBase64Encoded"])},
        "body": base64.b64encode(raw).decode("ascii"),
        "isBase64Encoded": True,
    }
"""

# Returns whatever the event's body (JSON) says to return.
RETURNS_BODY = """
import json
def handler(event, context):
    return json.loads(event["body"])
"""


@pytest.fixture(scope="module")
def canary(hxb_server: HxbServer) -> str:
    return deploy_canary(hxb_server)


@pytest.fixture(scope="module")
def echo(hxb_server: HxbServer) -> str:
    name = unique("http-echo")
    hxb_server.deploy(name, {"index.py": ECHO_EVENT})
    return name


@pytest.fixture(scope="module")
def mirror(hxb_server: HxbServer) -> str:
    name = unique("http-mirror")
    hxb_server.deploy(name, {"index.py": MIRROR_BODY})
    return name


@pytest.fixture(scope="module")
def returns(hxb_server: HxbServer) -> str:
    name = unique("http-returns")
    hxb_server.deploy(name, {"index.py": RETURNS_BODY})
    return name


# --- request -> event ---------------------------------------------------------------------------


def test_get_request_becomes_a_v2_event(hxb_server: HxbServer, echo: str) -> None:
    with hxb_server.client() as c:
        response = c.get(
            f"/fn/{echo}/users/42/items?x=1&y=two&x=3",
            headers=[
                ("X-Custom-Header", "Value One"),
                ("Cookie", "session=abc; theme=dark"),
                ("User-Agent", "hxb-test/1"),
                ("X-Multi", "a"),
                ("X-Multi", "b"),
            ],
        )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    event = response.json()["event"]
    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/users/42/items"
    assert event["rawQueryString"] == "x=1&y=two&x=3"
    assert event["queryStringParameters"] == {"x": "1,3", "y": "two"}
    assert event["headers"]["x-custom-header"] == "Value One"
    assert event["headers"]["user-agent"] == "hxb-test/1"
    assert event["headers"]["x-multi"] == "a,b"
    assert all(name == name.lower() for name in event["headers"]), event["headers"]
    assert "cookie" not in event["headers"]
    assert event["cookies"] == ["session=abc", "theme=dark"]
    assert event["pathParameters"] == {"proxy": "users/42/items"}
    http = event["requestContext"]["http"]
    assert http["method"] == "GET"
    assert http["path"] == "/users/42/items"
    assert http["sourceIp"] == "127.0.0.1"
    assert http["userAgent"] == "hxb-test/1"
    assert event["requestContext"]["requestId"] == response.json()["request_id"]
    assert event["isBase64Encoded"] is False
    assert "body" not in event


@pytest.mark.parametrize("suffix", ["", "/"])
def test_function_root_is_path_slash(hxb_server: HxbServer, echo: str, suffix: str) -> None:
    with hxb_server.client() as c:
        response = c.get(f"/fn/{echo}{suffix}")

    assert response.status_code == 200, response.text
    event = response.json()["event"]
    assert event["rawPath"] == "/"
    assert event["requestContext"]["http"]["path"] == "/"
    assert event["rawQueryString"] == ""
    assert "queryStringParameters" not in event
    assert "pathParameters" not in event


def test_percent_encoded_path_keeps_its_encoding_in_raw_path(hxb_server: HxbServer, echo: str) -> None:
    with hxb_server.client() as c:
        response = c.get(f"/fn/{echo}/a%2Fb/c%20d")

    event = response.json()["event"]
    assert event["rawPath"] == "/a%2Fb/c%20d"
    assert event["requestContext"]["http"]["path"] == "/a/b/c d"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_every_method_reaches_the_handler(hxb_server: HxbServer, echo: str, method: str) -> None:
    with hxb_server.client() as c:
        response = c.request(method, f"/fn/{echo}/thing", content=b"{}" if method != "GET" else None)

    assert response.status_code == 200, response.text
    assert response.json()["event"]["requestContext"]["http"]["method"] == method


def test_text_body_arrives_as_text(hxb_server: HxbServer, echo: str) -> None:
    body = json.dumps({"name": "Zoë", "n": 1})
    with hxb_server.client() as c:
        response = c.post(
            f"/fn/{echo}/", content=body.encode(), headers={"content-type": "application/json; charset=utf-8"}
        )

    event = response.json()["event"]
    assert event["isBase64Encoded"] is False
    assert event["body"] == body
    assert event["headers"]["content-type"] == "application/json; charset=utf-8"


def test_binary_body_arrives_base64_and_byte_exact(hxb_server: HxbServer, echo: str, mirror: str) -> None:
    payload = bytes(range(256))
    headers = {"content-type": "application/octet-stream"}
    with hxb_server.client() as c:
        seen = c.post(f"/fn/{echo}/upload", content=payload, headers=headers).json()["event"]
        mirrored = c.post(f"/fn/{mirror}/upload", content=payload, headers=headers)

    assert seen["isBase64Encoded"] is True
    assert base64.b64decode(seen["body"]) == payload
    assert mirrored.status_code == 200, mirrored.text
    assert mirrored.headers["x-was-base64"] == "True"
    assert mirrored.headers["content-type"] == "application/octet-stream"
    assert mirrored.content == payload


def test_text_labelled_body_that_is_not_utf8_arrives_base64_and_exact(hxb_server: HxbServer, mirror: str) -> None:
    payload = bytes(range(256))
    with hxb_server.client() as c:
        response = c.post(f"/fn/{mirror}/", content=payload, headers={"content-type": "text/plain"})

    assert response.status_code == 200, response.text
    assert response.headers["x-was-base64"] == "True"
    assert response.content == payload


def test_large_binary_round_trip_is_byte_exact(hxb_server: HxbServer, mirror: str) -> None:
    # Base64 grows the body by a third: 3 MB in stays well under the 6 MB event and result limits.
    payload = hashlib.shake_256(b"hxb").digest(3 * 1024 * 1024)
    with hxb_server.client() as c:
        response = c.post(f"/fn/{mirror}/", content=payload, headers={"content-type": "image/png"})

    assert response.status_code == 200, response.text
    assert len(response.content) == len(payload)
    assert response.content == payload


# --- result -> response -------------------------------------------------------------------------


def test_full_result_maps_to_status_headers_cookies_and_body(hxb_server: HxbServer, returns: str) -> None:
    result = {
        "statusCode": 201,
        "headers": {"content-type": "text/plain; charset=utf-8", "x-request-kind": "create", "x-count": 3},
        "cookies": ["session=xyz; Path=/; HttpOnly", "theme=light"],
        "body": "créé",
    }
    with hxb_server.client() as c:
        response = c.post(f"/fn/{returns}", content=json.dumps(result).encode())

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["x-request-kind"] == "create"
    assert response.headers["x-count"] == "3"
    assert response.headers.get_list("set-cookie") == ["session=xyz; Path=/; HttpOnly", "theme=light"]
    assert response.content == "créé".encode()


def test_base64_result_body_arrives_byte_exact(hxb_server: HxbServer, returns: str) -> None:
    payload = bytes(range(255, -1, -1))
    result = {
        "statusCode": 200,
        "headers": {"content-type": "application/octet-stream"},
        "body": base64.b64encode(payload).decode(),
        "isBase64Encoded": True,
    }
    with hxb_server.client() as c:
        response = c.post(f"/fn/{returns}", content=json.dumps(result).encode())

    assert response.status_code == 200, response.text
    assert response.content == payload


@pytest.mark.parametrize(
    "result",
    [
        pytest.param({"hello": "world", "n": [1, 2]}, id="dict"),
        pytest.param([1, "two", None], id="list"),
        pytest.param("just a string", id="string"),
        pytest.param(7, id="number"),
    ],
)
def test_plain_result_is_200_json(hxb_server: HxbServer, returns: str, result: object) -> None:
    with hxb_server.client() as c:
        response = c.post(f"/fn/{returns}", content=json.dumps(result).encode())

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == result


@pytest.mark.parametrize(
    "result",
    [
        pytest.param({"statusCode": "abc", "body": "x"}, id="status-not-a-number"),
        pytest.param({"statusCode": 200, "headers": "nope"}, id="headers-not-an-object"),
        pytest.param({"statusCode": 200, "body": "%%%", "isBase64Encoded": True}, id="bad-base64"),
        pytest.param({"statusCode": 200, "headers": {"x-evil": "a\r\nset-cookie: pwned=1"}}, id="header-injection"),
    ],
)
def test_malformed_result_is_502(hxb_server: HxbServer, returns: str, canary: str, result: object) -> None:
    with hxb_server.client() as c:
        response = c.post(f"/fn/{returns}", content=json.dumps(result).encode())

    assert response.status_code == 502, response.text
    assert response.json() == {"message": "Internal Server Error"}
    assert "pwned" not in str(response.headers)
    assert_canary_ok(hxb_server, canary)


# --- failures -----------------------------------------------------------------------------------


def test_unknown_function_is_404_not_found(hxb_server: HxbServer) -> None:
    with hxb_server.client() as c:
        response = c.get(f"/fn/{unique('nosuch')}/anything")

    assert response.status_code == 404
    assert response.json() == {"message": "Not Found"}


def test_handler_that_raises_is_500(hxb_server: HxbServer, canary: str) -> None:
    name = unique("http-raises")
    hxb_server.deploy(name, {"index.py": "def handler(event, context):\n    raise RuntimeError('secret detail')\n"})

    with hxb_server.client() as c:
        response = c.get(f"/fn/{name}/")

    assert response.status_code == 500, response.text
    assert response.json() == {"message": "Internal Server Error"}
    assert "secret detail" not in response.text
    assert_canary_ok(hxb_server, canary)


def test_body_over_6mb_is_413(hxb_server: HxbServer, echo: str, canary: str) -> None:
    with hxb_server.client() as c:
        response = c.post(f"/fn/{echo}/", content=b"x" * (PAYLOAD_LIMIT_BYTES + 1))

    assert response.status_code == 413, response.text
    assert_canary_ok(hxb_server, canary)


def test_handler_that_times_out_is_504(hxb_server: HxbServer, canary: str) -> None:
    name = unique("http-timeout")
    hxb_server.deploy(name, {"index.py": "import time\ndef handler(event, context):\n    time.sleep(60)\n"}, timeout=1)

    with hxb_server.client() as c:
        response = c.get(f"/fn/{name}/")

    assert response.status_code == 504, response.text
    assert_canary_ok(hxb_server, canary)
