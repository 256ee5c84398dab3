"""POST /2015-03-31/functions/{name}/invocations: Lambda's Invoke API, so that boto3, the
AWS CLI and SDKs pointed at hxb (`endpoint_url`) invoke functions unchanged."""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
import uuid
from typing import Any

from hxb.errors import (
    ClientError,
    InvalidRequestContentError,
    PlatformError,
    RequestTooLargeError,
    UnsupportedOperationError,
)
from hxb.gateway._asgi import ClientDisconnectedError, Receive, Scope, Send, header, read_body, send_response
from hxb.gateway.errors import lambda_error
from hxb.invoker import Invoker
from hxb.models import FunctionRevision, InvocationRequest, function_arn
from hxb.queue.dispatcher import AsyncDispatcher
from hxb.router import Router

PREFIX = "/2015-03-31/functions/"
_SUFFIX = "/invocations"
# Lambda's cap on the decoded X-Amz-Client-Context header.
_CLIENT_CONTEXT_MAX_BYTES = 3583
_EMPTY_EVENT = b"{}"


def parse_function_name(raw: str) -> tuple[str | None, str, str | None]:
    """`name`, `name:qualifier`, `account:function:name[:qualifier]` or a full ARN
    (`arn:<partition>:lambda:<region>:<account>:function:<name>[:<qualifier>]`) ->
    (workspace or None, name, qualifier or None). The ARN's account is the workspace."""
    parts = raw.split(":")
    if parts[0] == "arn":
        if len(parts) not in (7, 8) or parts[2] != "lambda" or parts[5] != "function":
            raise ClientError(f"{raw!r} is not a function name or ARN")
        workspace, name, qualifier = parts[4] or None, parts[6], parts[7] if len(parts) == 8 else None
    elif len(parts) in (3, 4) and parts[1] == "function":
        workspace, name, qualifier = parts[0], parts[2], parts[3] if len(parts) == 4 else None
    elif len(parts) <= 2:
        workspace, name, qualifier = None, parts[0], parts[1] if len(parts) == 2 else None
    else:
        raise ClientError(f"{raw!r} is not a function name or ARN")
    if not name or qualifier == "" or workspace == "":
        raise ClientError(f"{raw!r} is not a function name or ARN: a part of it is empty")
    return workspace, name, qualifier


def _client_context(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestContentError("X-Amz-Client-Context must be Base64-encoded JSON") from None
    if len(decoded) > _CLIENT_CONTEXT_MAX_BYTES:
        raise InvalidRequestContentError(
            f"X-Amz-Client-Context is {len(decoded)} bytes decoded; the limit is {_CLIENT_CONTEXT_MAX_BYTES}"
        )
    try:
        value = json.loads(decoded)
    except ValueError:
        raise InvalidRequestContentError("X-Amz-Client-Context must be Base64-encoded JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequestContentError("X-Amz-Client-Context must be a JSON object")
    return value


class InvokeHandler:
    def __init__(
        self,
        *,
        router: Router,
        invoker: Invoker,
        region: str,
        workspace: str,
        max_payload_bytes: int,
        queue: AsyncDispatcher | None = None,
        max_event_payload_bytes: int = 256 * 1024,
    ):
        self._router = router
        self._queue = queue
        self._max_event_payload_bytes = max_event_payload_bytes
        self._invoker = invoker
        self._region = region
        self._workspace = workspace
        self._max_payload_bytes = max_payload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        invocation_id = str(uuid.uuid4())
        try:
            await self._invoke(scope, receive, send, invocation_id)
        except ClientDisconnectedError:
            return
        except PlatformError as exc:
            status, headers, body = lambda_error(
                exc, region=self._region, workspace=self._workspace, request_id=invocation_id
            )
            await send_response(send, status, headers, body)

    def _target(self, scope: Scope) -> tuple[str, str, str | None]:
        """The workspace, function name and qualifier the request path and query name."""
        path: str = scope["path"]
        if scope["method"] != "POST" or not path.endswith(_SUFFIX):
            raise UnsupportedOperationError(f"{scope['method']} {path} is not an operation of this API")
        workspace, name, qualifier = parse_function_name(urllib.parse.unquote(path[len(PREFIX) : -len(_SUFFIX)]))
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "Qualifier" in query:
            if qualifier is not None and query["Qualifier"][0] != qualifier:
                raise ClientError("the qualifier in the function name does not match the Qualifier parameter")
            qualifier = query["Qualifier"][0]
        # A full ARN names the workspace (its account); a bare name means the default one.
        return workspace or self._workspace, name, qualifier

    @staticmethod
    def _options(scope: Scope) -> tuple[str, bool, dict[str, Any] | None]:
        """Invocation type, whether the log tail is wanted, and the client context."""
        invocation_type = (header(scope, b"x-amz-invocation-type") or b"RequestResponse").decode("latin-1")
        log_type = (header(scope, b"x-amz-log-type") or b"None").decode("latin-1")
        if invocation_type not in ("RequestResponse", "Event", "DryRun"):
            raise ClientError(f"X-Amz-Invocation-Type {invocation_type!r} is not RequestResponse, Event or DryRun")
        if log_type not in ("None", "Tail"):
            raise ClientError(f"X-Amz-Log-Type {log_type!r} is not None or Tail")
        return invocation_type, log_type == "Tail", _client_context(header(scope, b"x-amz-client-context"))

    async def _enqueue(
        self,
        send: Send,
        revision: FunctionRevision,
        invocation_id: str,
        payload: bytes,
        workspace: str,
        name: str,
        qualifier: str | None,
        client_context: dict[str, Any] | None,
    ) -> None:
        """Event: the event is in the store before the 202 goes out; the request id in the
        response is the one every attempt of it runs with."""
        if self._queue is None:
            raise UnsupportedOperationError("asynchronous invocation (X-Amz-Invocation-Type: Event) is not enabled")
        if len(payload) > self._max_event_payload_bytes:
            raise RequestTooLargeError("the event payload", len(payload), self._max_event_payload_bytes)
        await self._queue.enqueue(
            revision,
            event_id=invocation_id,
            payload=payload,
            invoked_arn=function_arn(self._region, workspace, name, qualifier),
            client_context=client_context,
        )
        await send_response(send, 202, [(b"x-amzn-requestid", invocation_id.encode()), (b"content-length", b"0")], b"")

    async def _invoke(self, scope: Scope, receive: Receive, send: Send, invocation_id: str) -> None:
        workspace, name, qualifier = self._target(scope)
        self._router.resolve(workspace, name, qualifier)  # an unknown function fails before its body is read
        invocation_type, want_tail, client_context = self._options(scope)
        payload = await read_body(scope, receive, limit_bytes=self._max_payload_bytes, what="the request payload")
        if payload.strip():
            try:
                json.loads(payload)
            except (ValueError, RecursionError) as exc:
                raise InvalidRequestContentError(f"Could not parse request body into json: {exc}") from None
        else:
            payload = _EMPTY_EVENT
        # Again after the (possibly slow) body: a deploy or delete meanwhile must win, and
        # from here to the pool there is no await.
        revision = self._router.resolve(workspace, name, qualifier)

        base_headers = [
            (b"x-amzn-requestid", invocation_id.encode()),
            (b"x-amz-executed-version", revision.version.encode()),
        ]
        if invocation_type == "DryRun":
            await send_response(send, 204, base_headers, b"")
            return
        if invocation_type == "Event":
            await self._enqueue(send, revision, invocation_id, payload, workspace, name, qualifier, client_context)
            return

        result = await self._invoker.invoke(
            revision,
            InvocationRequest(
                invocation_id=invocation_id,
                payload=payload,
                invoked_arn=function_arn(self._region, workspace, name, qualifier),
                client_context=client_context,
                want_log_tail=want_tail,
            ),
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(result.payload)).encode()),
            *base_headers,
        ]
        if result.function_error:
            headers.append((b"x-amz-function-error", b"Unhandled"))
        if result.log_tail is not None:
            headers.append((b"x-amz-log-result", base64.b64encode(result.log_tail.encode())))
        await send_response(send, 200, headers, result.payload)
