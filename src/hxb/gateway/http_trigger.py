"""ANY /fn/{name}[/{path}]: the HTTP trigger. The request becomes an API Gateway HTTP API
(payload 2.0) event; the handler's result becomes the response, as behind API Gateway."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

from hxb.errors import FunctionNotFoundError, PlatformError, RequestTooLargeError, ThrottledError
from hxb.gateway._asgi import ClientDisconnectedError, Receive, Scope, Send, header, read_body, send_response
from hxb.gateway.http_event import (
    HttpRequest,
    HttpResponse,
    MalformedHttpResponseError,
    build_event,
    build_response,
    error_response,
)
from hxb.invoker import Invoker
from hxb.models import InvocationRequest, function_arn
from hxb.router import Router

log = logging.getLogger(__name__)

PREFIX = "/fn/"
_TIMEOUT_TYPES = frozenset({"Sandbox.Timedout"})


class HttpTriggerHandler:
    def __init__(self, *, router: Router, invoker: Invoker, region: str, workspace: str, max_payload_bytes: int):
        self._router = router
        self._invoker = invoker
        self._region = region
        self._workspace = workspace
        self._max_payload_bytes = max_payload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = str(uuid.uuid4())
        try:
            response = await self._handle(scope, receive, request_id)
        except ClientDisconnectedError:
            return
        except FunctionNotFoundError:
            response = error_response(404, "Not Found")
        except RequestTooLargeError:
            response = error_response(413, "Request Entity Too Large")
        except ThrottledError as exc:
            response = error_response(429, "Too Many Requests")
            response = dataclasses.replace(
                response, headers=[*response.headers, (b"retry-after", str(max(1, round(exc.retry_after_s))).encode())]
            )
        except PlatformError as exc:
            response = error_response(exc.http_status if exc.http_status >= 400 else 500, exc.message)
        headers = [*response.headers, (b"x-hxb-request-id", request_id.encode())]
        await send_response(send, response.status, headers, response.body)

    async def _handle(self, scope: Scope, receive: Receive, request_id: str) -> HttpResponse:
        name, _, rest = scope["path"][len(PREFIX) :].partition("/")
        self._router.resolve(self._workspace, name)  # an unknown function fails before its body is read
        body = await read_body(scope, receive, limit_bytes=self._max_payload_bytes, what="the request body")
        # Again after the body: a deploy or delete meanwhile must win (no await from here to the pool).
        revision = self._router.resolve(self._workspace, name)
        raw_path = scope.get("raw_path")
        raw_rest: bytes | None = None
        if isinstance(raw_path, bytes):
            # Keep the client's own encoding (a %2F stays %2F) for the part after /fn/{name}.
            cut = raw_path.find(b"/", len(PREFIX))
            raw_rest = raw_path[cut:] if cut >= 0 else b"/"
        server = scope.get("server") or ("127.0.0.1", 80)
        client = scope.get("client") or ("", 0)
        host = header(scope, b"host")
        event = build_event(
            HttpRequest(
                method=scope["method"],
                path="/" + rest,
                raw_path=raw_rest,
                query_string=scope.get("query_string", b""),
                headers=scope["headers"],
                body=body,
                source_ip=client[0],
                http_version=scope.get("http_version", "1.1"),
                scheme=scope.get("scheme", "http"),
                host=host.decode("latin-1") if host else f"{server[0]}:{server[1]}",
            ),
            function_name=name,
            request_id=request_id,
            account_id=revision.workspace,
            time_epoch_ms=time.time_ns() // 1_000_000,
        )
        result = await self._invoker.invoke(
            revision,
            InvocationRequest(
                invocation_id=request_id,
                payload=event,
                invoked_arn=function_arn(self._region, revision.workspace, name),
            ),
        )
        if result.function_error:
            if result.error_type in _TIMEOUT_TYPES:
                return error_response(504, "Endpoint request timed out")
            return error_response(500, "Internal Server Error")
        try:
            return build_response(result.payload)
        except MalformedHttpResponseError as exc:
            log.warning(
                "function returned a malformed HTTP response",
                extra={"function": name, "request_id": request_id, "reason": str(exc)},
            )
            return error_response(502, "Internal Server Error")
