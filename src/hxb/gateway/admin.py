"""The management API (`/v1/...`): deploy, reconfigure, read, list and delete functions, read
their logs, list runtimes. Starlette, off the hot path."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hxb import __version__
from hxb.concurrency.admission import Admission
from hxb.concurrency.workspaces import Workspaces
from hxb.errors import ClientError, PackageTooLargeError, PlatformError, SpecError
from hxb.gateway.errors import management_error
from hxb.models import FunctionRevision
from hxb.pool.manager import PoolManager
from hxb.queue.dispatcher import AsyncDispatcher
from hxb.registry import FunctionRegistry
from hxb.runtimes import RuntimeCatalog
from hxb.store import Store

_MAX_LOG_PAGE = 10_000
_MAX_PATCH_BYTES = 64 * 1024
_INT64_MAX = 2**63 - 1


def function_view(revision: FunctionRevision, pool: PoolManager, admission: Admission) -> dict[str, Any]:
    cfg = revision.config
    stats = pool.function_statistics(revision.workspace, revision.name)
    usage = admission.function_usage(revision.workspace, revision.name)
    return {
        "name": revision.name,
        "workspace": revision.workspace,
        "arn": revision.arn,
        "version": revision.version,
        "revision_id": revision.revision_id,
        "runtime": cfg.runtime,
        "handler": cfg.handler,
        "memory": cfg.memory,
        "timeout": cfg.timeout,
        "description": cfg.description,
        "state": "Active",
        "code_sha256": revision.code_sha256,
        "code_size_bytes": revision.code_size_bytes,
        "last_modified": revision.last_modified,
        "log_group": revision.log_group,
        "instances": {
            "idle": stats.idle,
            "busy": stats.busy,
            "starting": stats.starting,
            "provisioned": stats.provisioned,
            "provisioned_shortfall": stats.provisioned_shortfall,
        },
        "concurrency": {
            "reserved": cfg.reserved_concurrency,
            "concurrent_executions": usage.running,
            "throttles": usage.throttles,
        },
        "config": cfg.model_dump(mode="json", by_alias=True),
    }


async def platform_error_response(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: every PlatformError of the management API ends here."""
    assert isinstance(exc, PlatformError)  # noqa: S101 -- registered for PlatformError only
    status, body = management_error(exc)
    return JSONResponse(body, status_code=status)


class AdminApi:
    def __init__(
        self,
        *,
        registry: FunctionRegistry,
        pool: PoolManager,
        admission: Admission,
        workspaces: Workspaces,
        store: Store,
        catalog: RuntimeCatalog,
        workspace: str,
        upload_dir: Path,
        max_package_bytes: int,
        sandbox_name: str,
        queue: AsyncDispatcher | None = None,
    ) -> None:
        self._queue = queue
        self._registry = registry
        self._pool = pool
        self._admission = admission
        self._workspaces = workspaces
        self._store = store
        self._catalog = catalog
        self._workspace = workspace
        self._upload_dir = upload_dir
        self._max_package_bytes = max_package_bytes
        self._sandbox_name = sandbox_name
        upload_dir.mkdir(parents=True, exist_ok=True)

    # --- helpers --------------------------------------------------------------------------------

    def _ws(self, request: Request) -> str:
        """The workspace a request is about: `?workspace=`, else the server's default one."""
        name = request.query_params.get("workspace") or self._workspace
        self._workspaces.get(name)
        return name

    def _view(self, revision: FunctionRevision) -> dict[str, Any]:
        return function_view(revision, self._pool, self._admission)

    async def _receive_package(self, request: Request) -> Path:
        """Streams the request body (a zip) to a temp file, refusing it past the 50 MB limit."""
        limit = self._max_package_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PackageTooLargeError(_too_large(int(declared), limit))
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=self._upload_dir)
        path = Path(name)
        size = 0
        try:
            # Chunks of at most 64 KiB go to the page cache: microseconds each, not worth a thread.
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        break
                    out.write(chunk)
        except BaseException:
            os.unlink(path)
            raise
        if size > limit or size == 0:
            os.unlink(path)
        if size > limit:
            raise PackageTooLargeError(_too_large(size, limit))
        if size == 0:
            raise ClientError("the request has no body: send the function's zip package (application/zip)")
        return path

    async def _deploy(self, request: Request, *, expected_name: str | None, create_only: bool) -> Response:
        path = await self._receive_package(request)
        try:
            revision, created = await self._registry.deploy(
                self._ws(request), path, expected_name=expected_name, create_only=create_only
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return JSONResponse(self._view(revision), status_code=201 if created else 200)

    # --- endpoints ------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        stats = self._pool.statistics()
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                "sandbox": self._sandbox_name,
                "functions": len(self._registry.list(self._workspace)),
                "instances": {"idle": stats.idle, "busy": stats.busy, "starting": stats.starting},
            }
        )

    async def list_runtimes(self, request: Request) -> Response:
        return JSONResponse(
            {
                "runtimes": [
                    {"name": r.name, "family": r.family, "version": r.version, "executable": str(r.executable)}
                    for r in self._catalog.list()
                ]
            }
        )

    async def list_functions(self, request: Request) -> Response:
        return JSONResponse({"functions": [self._view(r) for r in self._registry.list(self._ws(request))]})

    async def create_function(self, request: Request) -> Response:
        return await self._deploy(request, expected_name=None, create_only=True)

    async def put_function(self, request: Request) -> Response:
        return await self._deploy(request, expected_name=request.path_params["name"], create_only=False)

    async def get_function(self, request: Request) -> Response:
        revision = self._registry.get(self._ws(request), request.path_params["name"])
        return JSONResponse(self._view(revision))

    async def patch_function(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_PATCH_BYTES:
                raise ClientError(f"a configuration patch is at most {_MAX_PATCH_BYTES} bytes")
        try:
            patch = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise SpecError(f"request: the body is not valid JSON: {exc}", source="request") from None
        if not isinstance(patch, dict):
            raise SpecError("request: the body must be a JSON object of configuration fields", source="request")
        revision = await self._registry.update_config(self._ws(request), request.path_params["name"], patch)
        return JSONResponse(self._view(revision))

    async def delete_function(self, request: Request) -> Response:
        workspace, name = self._ws(request), request.path_params["name"]
        await self._registry.delete(workspace, name)
        if self._queue is not None:  # its pending events and dead letters go with it
            await self._queue.drop_function(workspace, name)
        return Response(status_code=204)

    async def function_logs(self, request: Request) -> Response:
        name = request.path_params["name"]
        workspace = self._ws(request)
        self._registry.get(workspace, name)
        q = request.query_params
        events = await self._store.query_logs(
            workspace,
            name,
            since_ms=_int_param(q.get("since_ms"), "since_ms"),
            after_id=_int_param(q.get("after_id"), "after_id"),
            invocation_id=q.get("invocation_id") or None,
            limit=_limit_param(q.get("limit")),
        )
        return JSONResponse(
            {
                "events": [
                    {
                        "id": e.id,
                        "stream": e.stream,
                        "invocation_id": e.invocation_id,
                        "timestamp_ms": e.ts_ms,
                        "message": e.message,
                    }
                    for e in events
                ],
                "next_after_id": events[-1].id if events else _int_param(q.get("after_id"), "after_id"),
                "server_time_ms": time.time_ns() // 1_000_000,
            }
        )


def _int_param(raw: str | None, name: str) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ClientError(f"query parameter {name}={raw!r} is not an integer") from None
    if not 0 <= value <= _INT64_MAX:
        raise ClientError(f"query parameter {name}={raw!r} is out of range")
    return value


def _limit_param(raw: str | None) -> int:
    limit = _int_param(raw, "limit")
    if limit is None:
        return 1000
    if not 1 <= limit <= _MAX_LOG_PAGE:
        raise ClientError(f"query parameter limit={limit} must be between 1 and {_MAX_LOG_PAGE}")
    return limit


def _too_large(size_bytes: int, limit_bytes: int) -> str:
    return (
        f"the package is {size_bytes / 1024 / 1024:.1f} MB zipped, over the "
        f"{limit_bytes / 1024 / 1024:.0f} MB limit for a direct upload"
    )
