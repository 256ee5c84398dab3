"""build_app: the gateway's ASGI application. The invoke and HTTP-trigger paths are raw ASGI
(measured: a framework there costs more than the rest of the warm path); everything else goes
to a Starlette app."""

from __future__ import annotations

import logging

from starlette.applications import Starlette

from hxb.errors import PlatformError
from hxb.gateway._asgi import Receive, Scope, Send
from hxb.gateway.admin import AdminApi, platform_error_response
from hxb.gateway.admin_async import AsyncApi
from hxb.gateway.admin_concurrency import ConcurrencyApi
from hxb.gateway.http_trigger import PREFIX as TRIGGER_PREFIX
from hxb.gateway.http_trigger import HttpTriggerHandler
from hxb.gateway.invoke import PREFIX as INVOKE_PREFIX
from hxb.gateway.invoke import InvokeHandler
from hxb.gateway.lambda_concurrency import LambdaConcurrencyApi
from hxb.gateway.routes import admin_routes
from hxb.services import Services

log = logging.getLogger(__name__)


class GatewayApp:
    def __init__(self, services: Services) -> None:
        settings = services.settings
        common = {
            "router": services.router,
            "invoker": services.invoker,
            "region": settings.region,
            "workspace": settings.workspace,
            "max_payload_bytes": settings.gateway.max_invoke_payload_bytes,
        }
        self._services = services
        self._invoke = InvokeHandler(
            **common,  # type: ignore[arg-type]
            queue=services.queue,
            max_event_payload_bytes=settings.async_.max_payload_bytes,
        )
        self._trigger = HttpTriggerHandler(**common)  # type: ignore[arg-type]
        api = AdminApi(
            registry=services.registry,
            pool=services.pool,
            admission=services.admission,
            workspaces=services.workspaces,
            store=services.store,
            catalog=services.catalog,
            workspace=settings.workspace,
            upload_dir=settings.data_dir / "uploads",
            max_package_bytes=settings.gateway.max_package_bytes,
            sandbox_name=services.sandbox_name,
            queue=services.queue,
        )
        async_api = AsyncApi(
            registry=services.registry,
            queue=services.queue,
            workspaces=services.workspaces,
            default_workspace=settings.workspace,
        )
        concurrency = ConcurrencyApi(
            registry=services.registry,
            admission=services.admission,
            workspaces=services.workspaces,
            default_workspace=settings.workspace,
        )
        lambda_concurrency = LambdaConcurrencyApi(
            registry=services.registry,
            admission=services.admission,
            region=settings.region,
            workspace=settings.workspace,
        )
        self._admin = Starlette(
            routes=[*admin_routes(api, concurrency, async_api), *lambda_concurrency.routes()],
            exception_handlers={PlatformError: platform_error_response},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(INVOKE_PREFIX):
                await self._invoke(scope, receive, send)
            elif path.startswith(TRIGGER_PREFIX):
                await self._trigger(scope, receive, send)
            else:
                await self._admin(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self._admin(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._services.start()
                except Exception as exc:  # a boundary: uvicorn reports it and exits
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._services.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_app(services: Services) -> GatewayApp:
    return GatewayApp(services)
