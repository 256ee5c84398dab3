"""Lambda's own concurrency operations, so boto3's `put_function_concurrency`,
`get_function_concurrency`, `delete_function_concurrency` and `get_account_settings` work
against hxb unchanged. A function ARN's account is its workspace, as on the Invoke API."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hxb.concurrency.admission import Admission
from hxb.errors import ClientError, PlatformError
from hxb.gateway.errors import lambda_error
from hxb.gateway.invoke import parse_function_name
from hxb.registry import FunctionRegistry

_MAX_BODY_BYTES = 4096
Handler = Callable[[Request], Awaitable[Response]]


class LambdaConcurrencyApi:
    def __init__(self, *, registry: FunctionRegistry, admission: Admission, region: str, workspace: str) -> None:
        self._registry = registry
        self._admission = admission
        self._region = region
        self._workspace = workspace

    def routes(self) -> list[Route]:
        path = "/functions/{name}/concurrency"
        return [
            Route(f"/2017-10-31{path}", self._lambda_errors(self.put_concurrency), methods=["PUT"]),
            Route(f"/2019-09-30{path}", self._lambda_errors(self.get_concurrency), methods=["GET"]),
            Route(f"/2017-10-31{path}", self._lambda_errors(self.delete_concurrency), methods=["DELETE"]),
            Route("/2016-08-19/account-settings", self._lambda_errors(self.account_settings), methods=["GET"]),
        ]

    def _lambda_errors(self, handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except PlatformError as exc:
                status, headers, body = lambda_error(
                    exc, region=self._region, workspace=self._workspace, request_id=str(uuid.uuid4())
                )
                return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})

        return wrapped

    def _function(self, request: Request) -> tuple[str, str]:
        workspace, name, _ = parse_function_name(urllib.parse.unquote(request.path_params["name"]))
        workspace = workspace or self._workspace
        self._registry.get(workspace, name)  # 404 ResourceNotFoundException
        return workspace, name

    async def put_concurrency(self, request: Request) -> Response:
        workspace, name = self._function(request)
        body = await request.body()
        if len(body) > _MAX_BODY_BYTES:
            raise ClientError(f"the request body is at most {_MAX_BODY_BYTES} bytes")
        try:
            doc: Any = json.loads(body or b"{}")
        except ValueError:
            raise ClientError("the body is not valid JSON") from None
        reserved = doc.get("ReservedConcurrentExecutions") if isinstance(doc, dict) else None
        if not isinstance(reserved, int) or isinstance(reserved, bool) or reserved < 0:
            raise ClientError("ReservedConcurrentExecutions must be an integer >= 0")
        await self._registry.update_config(workspace, name, {"reserved_concurrency": reserved})
        return JSONResponse({"ReservedConcurrentExecutions": reserved})

    async def get_concurrency(self, request: Request) -> Response:
        workspace, name = self._function(request)
        reserved = self._registry.get(workspace, name).config.reserved_concurrency
        return JSONResponse({} if reserved is None else {"ReservedConcurrentExecutions": reserved})

    async def delete_concurrency(self, request: Request) -> Response:
        workspace, name = self._function(request)
        await self._registry.update_config(workspace, name, {"reserved_concurrency": None})
        return Response(status_code=204)

    async def account_settings(self, request: Request) -> Response:
        limits = self._admission.workspace_limits(self._workspace)
        functions = self._registry.list(self._workspace)
        return JSONResponse(
            {
                "AccountLimit": {
                    "ConcurrentExecutions": limits.default_concurrency,
                    "UnreservedConcurrentExecutions": limits.unreserved_limit,
                    "CodeSizeUnzipped": 250 * 1024 * 1024,
                    "CodeSizeZipped": 50 * 1024 * 1024,
                    "TotalCodeSize": 75 * 1024**3,
                },
                "AccountUsage": {
                    "FunctionCount": len(functions),
                    "TotalCodeSize": sum(r.code_size_bytes for r in functions),
                },
            }
        )
