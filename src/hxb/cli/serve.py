"""`hxb serve`: gateway, router and pool in one process, on one uvloop event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hxb.cli.client import CliError
from hxb.errors import PlatformError

if TYPE_CHECKING:
    from hxb.config import Settings
    from hxb.services import Services

DEMO_FUNCTION = "hello"  # the demo `--demo` deploys; hxb.services ships it


def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on [HXB_GATEWAY_HOST].")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port; 0 picks a free one [HXB_GATEWAY_PORT].")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data directory [HXB_DATA_DIR].")] = None,
    region: Annotated[str | None, typer.Option("--region", help="Region name [HXB_REGION].")] = None,
    demo: Annotated[bool, typer.Option("--demo", help=f"Deploy the demo function {DEMO_FUNCTION!r}.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="Platform log level.")] = "info",
) -> None:
    """Run the platform: the gateway, router and pool, on an embedded store by default."""
    from hxb.config import load_settings

    flags: dict[str, Any] = {
        "HXB_GATEWAY_HOST": host,
        "HXB_GATEWAY_PORT": port,
        "HXB_DATA_DIR": data_dir,
        "HXB_REGION": region,
    }
    overrides = {key: value for key, value in flags.items() if value is not None}
    try:
        settings = load_settings(os.environ, overrides)
    except PlatformError as exc:
        raise CliError(str(exc), exit_code=2) from None
    _configure_logging(log_level)
    run(settings, demo=demo)


def _configure_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise CliError(f"--log-level {level!r}: expected debug, info, warning or error", exit_code=2)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _bind(settings: Settings) -> socket.socket:
    host, port = settings.gateway.host, settings.gateway.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _prepare_process() -> None:
    """Fds this process inherited are not for instances (they inherit every inheritable fd),
    and each instance costs the platform a few fds: use the whole allowance."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(settings: Settings, *, demo: bool) -> None:
    import uvloop

    _prepare_process()
    # After a graceful shutdown uvicorn re-raises the signal it caught; with this handler in
    # place that ends the process with status 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = _bind(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(_serve(settings, sock, demo=demo))
        except KeyboardInterrupt:
            pass
        except PlatformError as exc:
            raise CliError(str(exc)) from None


async def _serve(settings: Settings, sock: socket.socket, *, demo: bool) -> None:
    import uvicorn

    from hxb.gateway.app import build_app
    from hxb.services import Services

    services = await Services.open(settings)
    services.deploy_demo = demo
    # `kill -USR1 <pid>`: what every task of the platform is waiting on, to stderr.
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    endpoint = _endpoint(settings, sock)
    config = uvicorn.Config(
        build_app(services),
        loop="none",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.gateway.graceful_shutdown_s) or None,
        server_header=False,
        proxy_headers=False,
        date_header=False,
    )
    server = uvicorn.Server(config)
    server_task = asyncio.create_task(server.serve(sockets=[sock]))
    # uvicorn has no "started" event to wait on; it sets a flag once it listens.
    while not server.started and not server_task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    if server.started:
        _banner(settings, services, endpoint, demo=demo)
    await server_task
    if not server.started:
        await services.stop()
        raise CliError("hxb failed to start: see the errors above")


def _dump_tasks() -> None:
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} tasks ---", file=sys.stderr, flush=True)
    for task in tasks:
        task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


def _endpoint(settings: Settings, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 -- display only
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _banner(settings: Settings, services: Services, endpoint: str, *, demo: bool) -> None:
    lines = [
        f"hxb listening on {endpoint}",
        f"  data dir: {settings.data_dir.resolve()}   store: {settings.store_url.split('://')[0]}   "
        f"sandbox: {services.sandbox_name}   region: {settings.region}",
        f"  runtimes: {', '.join(r.name for r in services.catalog.list()) or 'none found'}",
    ]
    lines.extend(f"  WARNING: {problem}" for problem in services.sandbox_degraded)
    if services.sandbox_degraded:
        lines.append("  (`hxb doctor` says what this host lacks and how to fix it)")
    if demo:
        lines += [
            f"demo function {DEMO_FUNCTION!r} is deployed. Try:",
            f"  curl '{endpoint}/fn/{DEMO_FUNCTION}?name=you'",
            f'  curl -X POST {endpoint}/2015-03-31/functions/{DEMO_FUNCTION}/invocations -d \'{{"name": "you"}}\'',
            f'  HXB_ENDPOINT={endpoint} .venv/bin/hxb function invoke {DEMO_FUNCTION} --payload \'{{"name": "you"}}\'',
        ]
    print("\n".join(lines), flush=True)
