"""The HTTP trigger's mapping: request -> payload 2.0 event, handler result -> HTTP response."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hxb.gateway.http_event import (
    HttpRequest,
    HttpResponse,
    MalformedHttpResponseError,
    build_event,
    build_response,
    error_response,
)


def make_request(
    *,
    method: str = "GET",
    path: str = "/",
    raw_path: bytes | None = None,
    query_string: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    source_ip: str = "203.0.113.7",
    host: str = "api.example.com:8080",
) -> HttpRequest:
    return HttpRequest(
        method=method,
        path=path,
        raw_path=raw_path,
        query_string=query_string,
        headers=headers,
        body=body,
        source_ip=source_ip,
        http_version="1.1",
        scheme="http",
        host=host,
    )


def event_of(request: HttpRequest, *, time_epoch_ms: int = 0) -> dict[str, Any]:
    raw = build_event(
        request, function_name="echo", request_id="req-1", account_id="123456789012", time_epoch_ms=time_epoch_ms
    )
    event: dict[str, Any] = json.loads(raw.decode("utf-8"))
    return event


def response_of(result: object) -> HttpResponse:
    return build_response(json.dumps(result).encode("utf-8"))


def header_values(response: HttpResponse, name: bytes) -> list[bytes]:
    return [value for key, value in response.headers if key == name]


# --- event ----------------------------------------------------------------------------------------


def test_event_is_valid_json_with_the_format_2_top_level_fields() -> None:
    raw = build_event(
        make_request(), function_name="echo", request_id="req-1", account_id="123456789012", time_epoch_ms=0
    )
    assert isinstance(raw, bytes)
    event = json.loads(raw.decode("utf-8"))
    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/"
    assert event["rawQueryString"] == ""
    assert "stageVariables" not in event


def test_query_parameters_join_repeated_keys_and_keep_blank_values() -> None:
    event = event_of(make_request(query_string=b"a=1&b=&a=2&c&d=x%20y%2Bz&e=caf%C3%A9&f=a+b"))
    assert event["rawQueryString"] == "a=1&b=&a=2&c&d=x%20y%2Bz&e=caf%C3%A9&f=a+b"
    assert event["queryStringParameters"] == {"a": "1,2", "b": "", "c": "", "d": "x y+z", "e": "café", "f": "a b"}


def test_query_parameters_omitted_when_no_query_string() -> None:
    event = event_of(make_request())
    assert "queryStringParameters" not in event
    assert event["rawQueryString"] == ""


def test_headers_join_duplicates_with_comma_and_keep_lowercase_names() -> None:
    event = event_of(
        make_request(headers=[(b"accept", b"text/html"), (b"x-custom", b"1"), (b"accept", b"application/json")])
    )
    assert event["headers"] == {"accept": "text/html,application/json", "x-custom": "1"}


def test_cookies_move_from_headers_to_list_when_two_cookie_headers() -> None:
    event = event_of(make_request(headers=[(b"cookie", b"a=1; b=2;c=3"), (b"x", b"y"), (b"cookie", b"d=4")]))
    assert event["cookies"] == ["a=1", "b=2", "c=3", "d=4"]
    assert "cookie" not in event["headers"]
    assert event["headers"] == {"x": "y"}


def test_cookies_omitted_when_no_cookie_header() -> None:
    assert "cookies" not in event_of(make_request(headers=[(b"accept", b"*/*")]))


def test_path_parameters_omitted_when_root_path() -> None:
    event = event_of(make_request(path="/", raw_path=b"/"))
    assert event["rawPath"] == "/"
    assert event["requestContext"]["http"]["path"] == "/"
    assert "pathParameters" not in event


def test_path_parameters_hold_proxy_when_nested_path() -> None:
    event = event_of(make_request(path="/users/a b/c/d", raw_path=b"/users/a%20b/c/d"))
    assert event["rawPath"] == "/users/a%20b/c/d"
    assert event["requestContext"]["http"]["path"] == "/users/a b/c/d"
    assert event["pathParameters"] == {"proxy": "users/a b/c/d"}


def test_raw_path_keeps_encoded_slash_when_raw_path_given() -> None:
    event = event_of(make_request(path="/a/b", raw_path=b"/a%2Fb"))
    assert event["rawPath"] == "/a%2Fb"


def test_raw_path_is_requoted_when_raw_path_unknown() -> None:
    event = event_of(make_request(path="/a b/100%/é?#x", raw_path=None))
    assert event["rawPath"] == "/a%20b/100%25/%C3%A9%3F%23x"


def test_raw_path_is_root_when_empty() -> None:
    event = event_of(make_request(path="", raw_path=b""))
    assert event["rawPath"] == "/"
    assert event["requestContext"]["http"]["path"] == "/"


def test_text_body_is_a_string_when_text_content_type() -> None:
    event = event_of(
        make_request(method="POST", headers=[(b"content-type", b"text/plain; charset=utf-8")], body="hé".encode())
    )
    assert event["body"] == "hé"
    assert event["isBase64Encoded"] is False


def test_json_body_is_a_string_when_json_content_type() -> None:
    body = b'{"a": [1, 2], "b": "\xc3\xa9"}'
    event = event_of(make_request(method="POST", headers=[(b"content-type", b"application/json")], body=body))
    assert event["isBase64Encoded"] is False
    assert json.loads(event["body"]) == {"a": [1, 2], "b": "é"}


@pytest.mark.parametrize(
    "content_type",
    [b"application/xml", b"application/javascript", b"application/vnd.api+json", b"image/svg+xml", b"TEXT/CSV"],
)
def test_body_is_a_string_when_textual_content_type(content_type: bytes) -> None:
    event = event_of(make_request(method="POST", headers=[(b"content-type", content_type)], body=b"<x/>"))
    assert event["body"] == "<x/>"
    assert event["isBase64Encoded"] is False


def test_body_is_a_string_when_no_content_type_and_utf8() -> None:
    event = event_of(make_request(method="POST", body=b"plain"))
    assert event["body"] == "plain"
    assert event["isBase64Encoded"] is False


def test_form_body_is_a_string_when_urlencoded() -> None:
    body = b"name=J%C3%BCrgen&tags=a&tags=b"
    event = event_of(
        make_request(method="POST", headers=[(b"content-type", b"application/x-www-form-urlencoded")], body=body)
    )
    assert event["body"] == "name=J%C3%BCrgen&tags=a&tags=b"
    assert event["isBase64Encoded"] is False


def test_binary_body_round_trips_through_base64_when_octet_stream() -> None:
    body = bytes(range(256))
    event = event_of(make_request(method="PUT", headers=[(b"content-type", b"application/octet-stream")], body=body))
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body


def test_body_is_base64_when_text_content_type_but_not_utf8() -> None:
    body = "café".encode("latin-1")
    event = event_of(make_request(method="POST", headers=[(b"content-type", b"text/plain")], body=body))
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body


def test_body_omitted_when_no_body() -> None:
    event = event_of(make_request(headers=[(b"content-type", b"application/json")]))
    assert "body" not in event
    assert event["isBase64Encoded"] is False


def test_request_context_fields() -> None:
    event = event_of(
        make_request(
            method="DELETE",
            path="/x",
            raw_path=b"/x",
            headers=[(b"user-agent", b"curl/8.5.0")],
            source_ip="198.51.100.4",
            host="fn.example.com:8443",
        ),
        time_epoch_ms=1_700_000_000_123,
    )
    assert event["requestContext"] == {
        "accountId": "123456789012",
        "apiId": "hxb",
        "domainName": "fn.example.com",
        "domainPrefix": "fn",
        "http": {
            "method": "DELETE",
            "path": "/x",
            "protocol": "HTTP/1.1",
            "sourceIp": "198.51.100.4",
            "userAgent": "curl/8.5.0",
        },
        "requestId": "req-1",
        "routeKey": "$default",
        "stage": "$default",
        "time": "14/Nov/2023:22:13:20 +0000",
        "timeEpoch": 1_700_000_000_123,
    }


def test_request_context_time_is_epoch_when_time_zero() -> None:
    context = event_of(make_request(), time_epoch_ms=0)["requestContext"]
    assert context["time"] == "01/Jan/1970:00:00:00 +0000"
    assert context["timeEpoch"] == 0


def test_request_context_user_agent_is_empty_when_no_header() -> None:
    assert event_of(make_request())["requestContext"]["http"]["userAgent"] == ""


@pytest.mark.parametrize(
    ("host", "domain_name"),
    [("localhost", "localhost"), ("localhost:8080", "localhost"), ("[::1]:8080", "[::1]"), ("a.b.c:1", "a.b.c")],
)
def test_domain_name_drops_port(host: str, domain_name: str) -> None:
    assert event_of(make_request(host=host))["requestContext"]["domainName"] == domain_name


@given(body=st.binary(min_size=1))
def test_any_body_round_trips_through_base64_when_octet_stream(body: bytes) -> None:
    event = event_of(make_request(method="POST", headers=[(b"content-type", b"application/octet-stream")], body=body))
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"], validate=True) == body


# --- response -------------------------------------------------------------------------------------


def test_full_response_maps_status_headers_cookies_and_base64_body() -> None:
    payload = bytes(range(256))
    response = response_of(
        {
            "statusCode": 201,
            "headers": {"Content-Type": "image/png", "X-Count": 3, "X-Flag": True, "X-List": ["a", "b"]},
            "multiValueHeaders": {"X-Multi": ["1", "2"]},
            "cookies": ["a=1; Path=/", "b=2; HttpOnly"],
            "body": base64.b64encode(payload).decode("ascii"),
            "isBase64Encoded": True,
        }
    )
    assert response.status == 201
    assert response.body == payload
    assert response.headers == [
        (b"content-type", b"image/png"),
        (b"x-count", b"3"),
        (b"x-flag", b"true"),
        (b"x-list", b"a,b"),
        (b"x-multi", b"1"),
        (b"x-multi", b"2"),
        (b"set-cookie", b"a=1; Path=/"),
        (b"set-cookie", b"b=2; HttpOnly"),
        (b"content-length", b"256"),
    ]


def test_status_only_response_has_empty_body_and_no_content_type() -> None:
    response = response_of({"statusCode": 404})
    assert response == HttpResponse(status=404, headers=[(b"content-length", b"0")], body=b"")


def test_text_body_is_utf8_without_added_content_type() -> None:
    response = response_of({"statusCode": 200, "body": "héllo"})
    assert response.body == "héllo".encode()
    assert header_values(response, b"content-type") == []
    assert header_values(response, b"content-length") == [b"6"]


def test_non_string_body_is_json_encoded() -> None:
    response = response_of({"statusCode": 200, "body": {"a": 1}})
    assert json.loads(response.body) == {"a": 1}


def test_null_body_is_empty() -> None:
    assert response_of({"statusCode": 200, "body": None, "headers": None}).body == b""


def test_function_framing_headers_are_replaced_by_ours() -> None:
    response = response_of(
        {"statusCode": 200, "headers": {"Content-Length": "999", "Transfer-Encoding": "chunked"}, "body": "ok"}
    )
    assert response.headers == [(b"content-length", b"2")]


def test_no_content_length_and_no_body_when_status_204() -> None:
    response = response_of({"statusCode": 204, "body": "ignored"})
    assert response == HttpResponse(status=204, headers=[], body=b"")


@pytest.mark.parametrize("result", ["hello", 42, 1.5, [1, "two", None], {"message": "hi"}, None, True])
def test_non_response_value_is_a_200_json_body(result: object) -> None:
    response = response_of(result)
    assert response.status == 200
    assert header_values(response, b"content-type") == [b"application/json"]
    assert json.loads(response.body) == result
    assert header_values(response, b"content-length") == [str(len(response.body)).encode()]


def test_string_result_keeps_its_json_quotes() -> None:
    assert build_response(b'"hello"').body == b'"hello"'


def test_null_result_is_a_200_null_body() -> None:
    response = build_response(b"null")
    assert (response.status, response.body) == (200, b"null")


def test_inferred_body_is_the_result_without_surrounding_whitespace() -> None:
    assert build_response(b' {"a": "\xc3\xa9"}\n').body == b'{"a": "\xc3\xa9"}'


@pytest.mark.parametrize("status_code", ["200", 200.0, True, None, 99, 150, 600, -1, [200]])
def test_malformed_when_bad_status_code(status_code: object) -> None:
    with pytest.raises(MalformedHttpResponseError, match="statusCode"):
        response_of({"statusCode": status_code})


@pytest.mark.parametrize("body", ["not base64!", "abc", "é"])
def test_malformed_when_invalid_base64(body: str) -> None:
    with pytest.raises(MalformedHttpResponseError, match="base64"):
        response_of({"statusCode": 200, "body": body, "isBase64Encoded": True})


def test_base64_body_tolerates_line_breaks() -> None:
    response = response_of({"statusCode": 200, "body": "aGVs\nbG8=\n", "isBase64Encoded": True})
    assert response.body == b"hello"


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: evil=1", "a\nb", "a\rb", "a\x00b"])
def test_malformed_when_control_character_in_header_value(value: str) -> None:
    with pytest.raises(MalformedHttpResponseError, match="control character"):
        response_of({"statusCode": 200, "headers": {"X-Evil": value}})


def test_malformed_when_crlf_in_cookie() -> None:
    with pytest.raises(MalformedHttpResponseError, match="control character"):
        response_of({"statusCode": 200, "cookies": ["a=1\r\nX-Evil: 1"]})


@pytest.mark.parametrize("name", ["X Evil", "X-Evil\r\nA", "", "Ünïcode"])
def test_malformed_when_header_name_is_not_a_token(name: str) -> None:
    with pytest.raises(MalformedHttpResponseError, match="not a valid HTTP token"):
        response_of({"statusCode": 200, "headers": {name: "v"}})


def test_malformed_when_header_value_not_latin1() -> None:
    with pytest.raises(MalformedHttpResponseError, match="latin-1"):
        response_of({"statusCode": 200, "headers": {"X-Name": "日本"}})


def test_latin1_header_value_is_kept() -> None:
    response = response_of({"statusCode": 200, "headers": {"X-Name": "café"}})
    assert header_values(response, b"x-name") == [b"caf\xe9"]


@pytest.mark.parametrize(
    "result",
    [
        {"statusCode": 200, "headers": ["a"]},
        {"statusCode": 200, "headers": {"a": {"b": 1}}},
        {"statusCode": 200, "multiValueHeaders": "a"},
        {"statusCode": 200, "cookies": "a=1"},
        {"statusCode": 200, "cookies": [1]},
        {"statusCode": 200, "isBase64Encoded": "yes"},
        {"statusCode": 200, "body": [1], "isBase64Encoded": True},
    ],
)
def test_malformed_when_response_fields_have_wrong_types(result: object) -> None:
    with pytest.raises(MalformedHttpResponseError):
        response_of(result)


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"{'a': 1}", b"\xff\xfe", b"NaN", b'{"x": Infinity}', b"[" * 100_000]
)
def test_malformed_when_result_is_not_json(raw: bytes) -> None:
    with pytest.raises(MalformedHttpResponseError, match="not valid JSON"):
        build_response(raw)


def test_content_length_matches_body() -> None:
    response = response_of({"statusCode": 200, "body": "ü" * 10})
    assert header_values(response, b"content-length") == [b"20"]
    assert len(response.body) == 20


def test_error_response_is_json_message_with_length() -> None:
    response = error_response(504, "Endpoint request timed out")
    assert response.status == 504
    assert json.loads(response.body) == {"message": "Endpoint request timed out"}
    assert response.headers == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(response.body)).encode()),
    ]
