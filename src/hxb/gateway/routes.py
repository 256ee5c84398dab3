"""URL -> handler table of the management API. The hot routes (invoke, HTTP trigger) are
dispatched before these, in `app.py`, without a framework."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hxb.gateway.admin import AdminApi
from hxb.gateway.admin_async import AsyncApi
from hxb.gateway.admin_concurrency import ConcurrencyApi
from hxb.gateway.openapi import openapi_document


def admin_routes(api: AdminApi, concurrency: ConcurrencyApi, async_api: AsyncApi) -> list[Route]:
    document = openapi_document()

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    return [
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/health", api.health, methods=["GET"]),
        Route("/v1/runtimes", api.list_runtimes, methods=["GET"]),
        Route("/v1/functions", api.list_functions, methods=["GET"]),
        Route("/v1/functions", api.create_function, methods=["POST"]),
        Route("/v1/functions/{name}", api.get_function, methods=["GET"]),
        Route("/v1/functions/{name}", api.put_function, methods=["PUT"]),
        Route("/v1/functions/{name}", api.patch_function, methods=["PATCH"]),
        Route("/v1/functions/{name}", api.delete_function, methods=["DELETE"]),
        Route("/v1/functions/{name}/logs", api.function_logs, methods=["GET"]),
        Route("/v1/functions/{name}/async", async_api.function_async, methods=["GET"]),
        Route("/v1/functions/{name}/dlq", async_api.list_dead_letters, methods=["GET"]),
        Route("/v1/functions/{name}/dlq/redrive", async_api.redrive, methods=["POST"]),
        Route("/v1/functions/{name}/dlq/{event_id}", async_api.get_dead_letter, methods=["GET"]),
        Route("/v1/functions/{name}/concurrency", concurrency.get_function_concurrency, methods=["GET"]),
        Route("/v1/functions/{name}/concurrency", concurrency.put_function_concurrency, methods=["PUT"]),
        Route("/v1/functions/{name}/concurrency", concurrency.delete_function_concurrency, methods=["DELETE"]),
        Route("/v1/workspaces", concurrency.list_workspaces, methods=["GET"]),
        Route("/v1/workspaces", concurrency.create_workspace, methods=["POST"]),
        Route("/v1/workspaces/{name}", concurrency.get_workspace, methods=["GET"]),
        Route("/v1/workspaces/{name}/plan", concurrency.put_plan, methods=["PUT"]),
    ]
