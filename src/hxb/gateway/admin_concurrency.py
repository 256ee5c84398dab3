"""The management API's workspaces and concurrency: `/v1/workspaces...` (create, list, read,
change plan) and `/v1/functions/{name}/concurrency` (reserved concurrency)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hxb.concurrency.admission import Admission
from hxb.concurrency.workspaces import Workspaces
from hxb.errors import ClientError
from hxb.registry import FunctionRegistry
from hxb.store import WorkspaceRecord

_MAX_BODY_BYTES = 4096


class ConcurrencyApi:
    def __init__(
        self, *, registry: FunctionRegistry, admission: Admission, workspaces: Workspaces, default_workspace: str
    ) -> None:
        self._registry = registry
        self._admission = admission
        self._workspaces = workspaces
        self._default = default_workspace

    def _ws(self, request: Request) -> str:
        name = request.query_params.get("workspace") or self._default
        self._workspaces.get(name)
        return name

    def _workspace_view(self, record: WorkspaceRecord) -> dict[str, Any]:
        limits = self._admission.workspace_limits(record.name)
        return {"name": record.name, "created_at": record.created_at, **dataclasses.asdict(limits)}

    # --- workspaces -----------------------------------------------------------------------------

    async def list_workspaces(self, request: Request) -> Response:
        return JSONResponse({"workspaces": [self._workspace_view(r) for r in self._workspaces.list()]})

    async def create_workspace(self, request: Request) -> Response:
        body = await _json_object(request)
        name, plan = body.get("name"), body.get("plan", "team")
        if not isinstance(name, str) or not isinstance(plan, str):
            raise ClientError('the body must be {"name": "...", "plan": "single|team|enterprise"}')
        record = await self._workspaces.create(name, plan)
        return JSONResponse(self._workspace_view(record), status_code=201)

    async def get_workspace(self, request: Request) -> Response:
        return JSONResponse(self._workspace_view(self._workspaces.get(request.path_params["name"])))

    async def put_plan(self, request: Request) -> Response:
        body = await _json_object(request)
        plan = body.get("plan")
        if not isinstance(plan, str):
            raise ClientError('the body must be {"plan": "single|team|enterprise"}')
        record = await self._workspaces.set_plan(request.path_params["name"], plan)
        return JSONResponse(self._workspace_view(record))

    # --- reserved concurrency -------------------------------------------------------------------

    def _concurrency_view(self, workspace: str, name: str) -> dict[str, Any]:
        revision = self._registry.get(workspace, name)
        usage = self._admission.function_usage(workspace, name)
        return {
            "name": name,
            "workspace": workspace,
            "reserved_concurrency": revision.config.reserved_concurrency,
            "concurrent_executions": usage.running,
            "throttles": usage.throttles,
        }

    async def get_function_concurrency(self, request: Request) -> Response:
        return JSONResponse(self._concurrency_view(self._ws(request), request.path_params["name"]))

    async def put_function_concurrency(self, request: Request) -> Response:
        body = await _json_object(request)
        reserved = body.get("reserved_concurrency")
        if not isinstance(reserved, int) or isinstance(reserved, bool) or reserved < 0:
            raise ClientError(
                f"reserved_concurrency must be an integer >= 0 (0 throttles the function), got {json.dumps(reserved)}"
            )
        workspace, name = self._ws(request), request.path_params["name"]
        await self._registry.update_config(workspace, name, {"reserved_concurrency": reserved})
        return JSONResponse(self._concurrency_view(workspace, name))

    async def delete_function_concurrency(self, request: Request) -> Response:
        workspace, name = self._ws(request), request.path_params["name"]
        await self._registry.update_config(workspace, name, {"reserved_concurrency": None})
        return Response(status_code=204)


async def _json_object(request: Request) -> dict[str, Any]:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY_BYTES:
            raise ClientError(f"the request body is at most {_MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(body or b"{}")
    except (ValueError, RecursionError) as exc:
        raise ClientError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ClientError("the body must be a JSON object")
    return value
