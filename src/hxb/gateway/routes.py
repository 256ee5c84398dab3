"""URL -> handler table of the management API. The hot routes (invoke, HTTP trigger) are
dispatched before these, in `app.py`, without a framework."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hxb.gateway.admin import AdminApi
from hxb.gateway.openapi import openapi_document


def admin_routes(api: AdminApi) -> list[Route]:
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
    ]
