"""The Invoke API's parsing of the function name (name, qualifier, partial or full ARN) and of
the X-Amz-Client-Context header."""

from __future__ import annotations

import base64
import json

import pytest

from hxb.errors import ClientError, InvalidRequestContentError
from hxb.gateway.invoke import _client_context, parse_function_name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("echo", (None, "echo", None)),
        ("echo:prod", (None, "echo", "prod")),
        ("echo:$LATEST", (None, "echo", "$LATEST")),
        ("team:function:echo", ("team", "echo", None)),
        ("team:function:echo:7", ("team", "echo", "7")),
        ("arn:aws:lambda:us-east-1:123456789012:function:echo", ("123456789012", "echo", None)),
        ("arn:hxb:lambda:local:default:function:echo:prod", ("default", "echo", "prod")),
        ("arn:aws:lambda:us-east-1::function:echo", (None, "echo", None)),
    ],
)
def test_parse_function_name_accepts_names_and_arns(raw: str, expected: tuple[str | None, str, str | None]) -> None:
    assert parse_function_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "a:b:c",
        "echo:1:2",
        "team:function:echo:7:extra",
        "arn:aws:s3:::bucket",
        "arn:aws:lambda:us-east-1:123:function",
        "arn:aws:lambda:us-east-1:123:layer:echo",
        "arn:aws:lambda:us-east-1:123:function:echo:1:extra",
    ],
)
def test_parse_function_name_refuses_junk(raw: str) -> None:
    with pytest.raises(ClientError, match="is not a function name or ARN"):
        parse_function_name(raw)


@pytest.mark.parametrize("raw", ["", ":prod", "echo:", "arn:aws:lambda:r:1:function:"])
def test_parse_function_name_refuses_empty_name_or_qualifier(raw: str) -> None:
    # Lambda's FunctionName pattern needs a name of 1+ characters and, after a colon, a qualifier of 1+.
    with pytest.raises(ClientError):
        parse_function_name(raw)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_client_context_absent_is_none() -> None:
    assert _client_context(None) is None


def test_client_context_decodes_base64_json() -> None:
    context = {"client": {"app_title": "demo"}, "custom": {"k": "v"}, "env": {"locale": "en"}}

    assert _client_context(_b64(json.dumps(context).encode())) == context


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not base64!", "must be Base64-encoded JSON"),
        (_b64(b"not json"), "must be Base64-encoded JSON"),
        (_b64(b"[1, 2]"), "must be a JSON object"),
        (_b64(b'"text"'), "must be a JSON object"),
    ],
)
def test_client_context_refuses_what_is_not_a_base64_json_object(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestContentError, match=message):
        _client_context(raw)


def test_client_context_size_limit_is_on_the_decoded_bytes() -> None:
    def padded(size: int) -> bytes:
        doc = b'{"custom":{"p":"' + b"x" * (size - 19) + b'"}}'
        assert len(doc) == size
        return doc

    assert _client_context(_b64(padded(3583))) is not None
    with pytest.raises(InvalidRequestContentError, match="3584 bytes decoded; the limit is 3583"):
        _client_context(_b64(padded(3584)))
