"""The HTTP trigger's wire mapping: an HTTP request -> an API Gateway HTTP API payload 2.0 event,
and a handler's JSON result -> an HTTP response. Pure: no I/O, no asyncio; the ASGI gateway calls it.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, quote

__all__ = [
    "HttpRequest",
    "HttpResponse",
    "MalformedHttpResponseError",
    "build_event",
    "build_response",
    "error_response",
]

_TEXT_MEDIA_TYPES: Final = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/x-www-form-urlencoded",
    }
)
# strftime's %b follows the process locale; the event's format is always English.
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# RFC 3986 pchar minus the unreserved set (which `quote` always keeps), plus "/": what a path may hold literally.
_PATH_SAFE: Final = "/:@!$&'()*+,;="
# RFC 9110 token characters: anything else in a header name could smuggle framing into the response.
_TCHARS: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Control characters other than HTAB end or split a header line (CR, LF) or are rejected by HTTP servers (NUL).
_FORBIDDEN_IN_VALUE: Final = frozenset(chr(c) for c in (*range(0x09), *range(0x0A, 0x20), 0x7F))
# Framing belongs to the gateway: a function's own length or transfer coding would contradict the body we send.
_FRAMING_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "connection"})
_JSON_WHITESPACE: Final = b" \t\r\n"
_JSON_CONTENT_TYPE: Final = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request to `/fn/{name}[/{path}]`, as the ASGI gateway sees it, with `/fn/{name}` stripped."""

    method: str
    path: str  # percent-decoded, always starts with "/"
    raw_path: bytes | None  # as sent (keeps %2F), when the server gives it
    query_string: bytes  # raw, not decoded
    headers: Sequence[tuple[bytes, bytes]]  # ASGI raw headers, names lowercase
    body: bytes
    source_ip: str
    http_version: str  # "1.1"
    scheme: str  # "http" / "https"
    host: str  # Host header value, or server host:port


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A response ready for ASGI `http.response.start` / `http.response.body`."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class MalformedHttpResponseError(Exception):
    """The handler's result cannot be turned into an HTTP response; the gateway answers 502."""


# --- request -> event ---------------------------------------------------------------------------


def _text(raw: bytes) -> str:
    # HTTP bytes are mostly ASCII/UTF-8; latin-1 never fails, so odd bytes still reach the function.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _is_text_media_type(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type.startswith("text/") or media_type in _TEXT_MEDIA_TYPES or media_type.endswith(("+json", "+xml"))


def _format_time(time_epoch_ms: int) -> str:
    t = time.gmtime(time_epoch_ms // 1000)
    return (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def _domain_name(host: str) -> str:
    if host.startswith("["):  # IPv6 literal: its colons are not a port separator
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def _raw_path(request: HttpRequest) -> str:
    if request.raw_path is not None:
        raw = _text(request.raw_path)
    else:
        # surrogatepass: a path with lone surrogates is garbage, but must not crash the hot path.
        raw = quote(request.path, safe=_PATH_SAFE, errors="surrogatepass")
    return raw if raw.startswith("/") else "/" + raw


def _query_parameters(raw_query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        # Format 2.0 has no multi-value map: repeated keys are comma-joined, as API Gateway does.
        params[key] = f"{params[key]},{value}" if key in params else value
    return params


def build_event(
    request: HttpRequest, *, function_name: str, request_id: str, account_id: str, time_epoch_ms: int
) -> bytes:
    """Returns the UTF-8 JSON event (API Gateway HTTP API payload format 2.0).

    `function_name` is not part of the 2.0 format (the route is always `$default`); it is accepted so
    that callers name what they invoke and the signature can grow without breaking them.
    """
    headers: dict[str, str] = {}
    cookies: list[str] = []
    content_type: str | None = None
    for raw_name, raw_value in request.headers:
        name = raw_name.decode("latin-1").lower()
        value = _text(raw_value)
        if name == "cookie":
            # Cookies move out of `headers` into their own list, one entry per cookie.
            cookies.extend(c for part in value.split(";") if (c := part.strip()))
            continue
        if name == "content-type" and content_type is None:
            content_type = value
        headers[name] = f"{headers[name]},{value}" if name in headers else value

    raw_path = _raw_path(request)
    path = request.path or "/"
    raw_query = _text(request.query_string)
    domain_name = _domain_name(request.host)

    event: dict[str, object] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if raw_query and (params := _query_parameters(raw_query)):
        event["queryStringParameters"] = params
    if path != "/":
        event["pathParameters"] = {"proxy": path[1:]}
    event["requestContext"] = {
        "accountId": account_id,
        "apiId": "hxb",
        "domainName": domain_name,
        "domainPrefix": domain_name.partition(".")[0],
        "http": {
            "method": request.method,
            "path": path,
            "protocol": f"HTTP/{request.http_version}",
            "sourceIp": request.source_ip,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": request_id,
        "routeKey": "$default",
        "stage": "$default",
        "time": _format_time(time_epoch_ms),
        "timeEpoch": time_epoch_ms,
    }
    body = request.body
    is_base64 = False
    if body:
        text: str | None = None
        if _is_text_media_type(content_type):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None  # binary despite its label: base64 keeps every byte
        if text is None:
            text = base64.b64encode(body).decode("ascii")
            is_base64 = True
        event["body"] = text
    event["isBase64Encoded"] = is_base64
    # ensure_ascii: always valid UTF-8 output, even if a str slipped in with lone surrogates.
    return json.dumps(event, separators=(",", ":")).encode("ascii")


# --- result -> response -------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise MalformedHttpResponseError(f"function result is not valid JSON: it contains {name}")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON may carry lone surrogates ("\ud800"); send U+FFFD rather than fail the whole response.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _header_value(name: str, value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)  # true/false and numbers spelled as the JSON had them, not Python's True
    raise MalformedHttpResponseError(f"header {name!r} has a value of type {type(value).__name__}: {value!r:.80}")


def _encode_header(name: str, value: str) -> tuple[bytes, bytes]:
    raw_name = name.lower().encode("latin-1", "replace")
    if not raw_name or not _TCHARS.issuperset(raw_name):
        raise MalformedHttpResponseError(f"header name {name!r:.80} is not a valid HTTP token")
    if not _FORBIDDEN_IN_VALUE.isdisjoint(value):
        # CR/LF would let the function inject headers or a second response.
        raise MalformedHttpResponseError(f"header {name!r} has a control character in its value: {value!r:.80}")
    try:
        return raw_name, value.encode("latin-1")
    except UnicodeEncodeError:
        raise MalformedHttpResponseError(
            f"header {name!r} value {value!r:.80} is not latin-1; hint: percent-encode it (RFC 8187)"
        ) from None


def _response_headers(result: dict[str, object]) -> list[tuple[bytes, bytes]]:
    lines: list[tuple[str, str]] = []
    headers = result.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise MalformedHttpResponseError(f"'headers' must be an object, not {type(headers).__name__}")
        for name, value in headers.items():
            if value is None:
                continue  # what `undefined` would have meant before JSON dropped it
            if isinstance(value, list):
                lines.append((name, ",".join(_header_value(name, v) for v in value)))
            else:
                lines.append((name, _header_value(name, value)))
    multi = result.get("multiValueHeaders")
    if multi is not None:
        if not isinstance(multi, dict):
            raise MalformedHttpResponseError(f"'multiValueHeaders' must be an object, not {type(multi).__name__}")
        for name, values in multi.items():
            items = values if isinstance(values, list) else [values]
            lines.extend((name, _header_value(name, v)) for v in items if v is not None)
    cookies = result.get("cookies")
    if cookies is not None:
        if not isinstance(cookies, list) or not all(isinstance(c, str) for c in cookies):
            raise MalformedHttpResponseError("'cookies' must be a list of strings")
        lines.extend(("set-cookie", c) for c in cookies)
    return [_encode_header(name, value) for name, value in lines if name.lower() not in _FRAMING_HEADERS]


def _response_body(result: dict[str, object]) -> bytes:
    body = result.get("body")
    is_base64 = result.get("isBase64Encoded", False)
    if is_base64 is None:
        is_base64 = False
    if not isinstance(is_base64, bool):
        raise MalformedHttpResponseError(f"'isBase64Encoded' must be a boolean, not {is_base64!r:.80}")
    if body is None:
        return b""
    if not isinstance(body, str):
        if is_base64:
            raise MalformedHttpResponseError(f"'body' must be a string when base64-encoded, not {type(body).__name__}")
        # A handler that returns an object as its body means it as JSON.
        return _utf8(json.dumps(body, ensure_ascii=False, separators=(",", ":")))
    if not is_base64:
        return _utf8(body)
    try:
        # Tolerate the line breaks MIME-style encoders insert; anything else outside the alphabet is an error.
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedHttpResponseError(f"'body' is marked isBase64Encoded but is not base64: {body!r:.80}") from None


def _status(value: object) -> int:
    # bool is an int to Python but `true` is not a status; 1xx are interim responses, never a final one.
    if not isinstance(value, int) or isinstance(value, bool) or not 200 <= value <= 599:
        raise MalformedHttpResponseError(f"'statusCode' must be an integer from 200 to 599, not {value!r:.80}")
    return value


def _with_length(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> HttpResponse:
    if status in (204, 304):
        # These statuses never carry a body, and a Content-Length would describe one (RFC 9110 8.6).
        return HttpResponse(status=status, headers=headers, body=b"")
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    return HttpResponse(status=status, headers=headers, body=body)


def build_response(result: bytes) -> HttpResponse:
    """Maps the handler's JSON result (bytes) to the HTTP response, as API Gateway does for format 2.0.

    An object with `statusCode` is a full response (`headers`, `multiValueHeaders`, `cookies`, `body`,
    `isBase64Encoded`); any other JSON value is sent as a 200 `application/json` body.

    Raises:
        MalformedHttpResponseError: the result is not JSON, or not a response HTTP can carry.
    """
    try:
        # Decode first: json.loads(bytes) would also accept UTF-16/32, which we would then pass on verbatim.
        value: object = json.loads(result.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8 as well as bad JSON; RecursionError a hostile "[[[[..." nesting.
        raise MalformedHttpResponseError(f"function result is not valid JSON: {exc}") from None
    if isinstance(value, dict) and "statusCode" in value:
        status = _status(value["statusCode"])
        return _with_length(status, _response_headers(value), _response_body(value))
    # Inferred format: the result itself is the body, byte for byte (a JSON string keeps its quotes).
    return _with_length(200, [_JSON_CONTENT_TYPE], result.strip(_JSON_WHITESPACE))


def error_response(status: int, message: str) -> HttpResponse:
    """An API-Gateway-style error: `{"message": ...}` as application/json (e.g. 502 "Internal Server Error")."""
    body = json.dumps({"message": message}).encode("ascii")
    return _with_length(status, [_JSON_CONTENT_TYPE], body)
