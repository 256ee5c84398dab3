"""`hxb`: the command line. Parses, dispatches, and turns every error into one line on stderr
and an exit code (the only place that exits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hxb import __version__
from hxb.cli import concurrency as concurrency_cli
from hxb.cli import function as function_cli
from hxb.cli import workspace as workspace_cli
from hxb.cli.client import DEFAULT_ENDPOINT, ApiClient, CliError
from hxb.cli.serve import serve
from hxb.errors import PlatformError

app = typer.Typer(
    name="hxb",
    help="hxb: a self-hosted serverless function platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="The hexabase.yaml format.", no_args_is_help=True)
function_cli.app.add_typer(concurrency_cli.app, name="concurrency")
app.add_typer(function_cli.app, name="function")
app.add_typer(workspace_cli.app, name="workspace")
app.add_typer(config_app, name="config")
app.command()(serve)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        print(f"hxb {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """hxb: deploy handler(event, context) functions and run them in isolated, reusable instances."""


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of hexabase.yaml (for editors and CI validation)."""
    from hxb.spec import function_file_json_schema

    print(json.dumps(function_file_json_schema(), indent=2))


@app.command()
def runtimes(
    endpoint: Annotated[str, typer.Option("--endpoint", envvar="HXB_ENDPOINT")] = DEFAULT_ENDPOINT,
    local: Annotated[bool, typer.Option("--local", help="Look on this machine instead of asking the server.")] = False,
) -> None:
    """List the runtimes the server offers (python3.X for every CPython it found)."""
    from rich.table import Table

    if local:
        rows = _local_runtimes()
    else:
        with ApiClient(endpoint) as client:
            rows = client.request("GET", "/v1/runtimes").json()["runtimes"]
    table = Table(box=None, header_style="bold")
    for column in ("RUNTIME", "VERSION", "EXECUTABLE"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["version"], row["executable"])
    out.print(table)


@app.command()
def doctor(
    uid: Annotated[int, typer.Option("--uid", envvar="HXB_SANDBOX_UID", help="The sandbox user id to check.")] = 990,
) -> None:
    """Report which isolation features this host gives instances, and what is missing."""
    from rich.table import Table

    from hxb.sandbox.doctor import check_host

    report = check_host(uid=uid)
    table = Table(box=None, header_style="bold")
    for column in ("FEATURE", "", "DETAIL", "HINT"):
        table.add_column(column)
    for feature in report.features:
        mark = "[green]ok[/]" if feature.ok else ("[red]MISSING[/]" if feature.required else "[yellow]degraded[/]")
        table.add_row(feature.name, mark, feature.detail, feature.hint)
    out.print(table)
    if report.complete:
        out.print("full isolation: every instance runs in the linux sandbox")
    elif report.sandbox_possible:
        out.print("[yellow]linux sandbox with reduced isolation[/]: see the features marked degraded")
    else:
        out.print("[red]no sandbox on this host[/]: `hxb serve` would run instances WITHOUT isolation")
    if not report.complete:
        raise typer.Exit(1)


sandbox_app = typer.Typer(help="The host side of the linux sandbox.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")


@sandbox_app.command("cleanup")
def sandbox_cleanup(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="HXB_DATA_DIR", help="The platform's data dir.")
    ] = Path(".hxb"),
) -> None:
    """Remove what a killed `hxb serve` left on this host (cgroups, network namespaces, /tmp
    volumes). `hxb serve` does it itself at start; this is for a platform you will not restart."""
    import asyncio

    from hxb.sandbox.linux import cleanup_host

    removed = asyncio.run(cleanup_host(data_dir))
    err.print(f"removed {removed} leftover objects of the platform at {data_dir.resolve()}")


def _local_runtimes() -> list[dict[str, str]]:
    import asyncio
    import tempfile
    from pathlib import Path

    from hxb.runtimes import RuntimeCatalog

    with tempfile.TemporaryDirectory() as tmp:
        catalog = asyncio.run(RuntimeCatalog.discover(Path(tmp)))
    return [{"name": r.name, "version": r.version, "executable": str(r.executable)} for r in catalog.list()]


def main() -> None:
    try:
        app()
    except CliError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except PlatformError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(1)
