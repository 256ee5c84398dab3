"""`hxb workspace ...`: create and list workspaces, change their plan."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from hxb.cli.client import DEFAULT_ENDPOINT, ApiClient

app = typer.Typer(help="Workspaces and their plans (single, team, enterprise).", no_args_is_help=True)
# Piped output (scripts, grep) is not cut to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)

EndpointOption = Annotated[
    str, typer.Option("--endpoint", envvar="HXB_ENDPOINT", help="URL of the hxb server.", show_default=True)
]
PlanArgument = Annotated[str, typer.Argument(help="single (also single_user), team or enterprise.")]


def _describe(ws: dict[str, Any]) -> str:
    return (
        f"{ws['name']}: {ws['plan']} plan, concurrency {ws['default_concurrency']} "
        f"(burst {ws['burst_concurrency']}), {ws['reserved_total']} of {ws['reserved_cap']} reservable reserved"
    )


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Workspace name: lowercase letters, digits and '-'.")],
    plan: Annotated[str, typer.Option("--plan", help="single, team or enterprise.")] = "team",
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Create workspace NAME on a plan."""
    with ApiClient(endpoint) as client:
        ws = client.request("POST", "/v1/workspaces", json_body={"name": name, "plan": plan}).json()
    err.print(f"Created {_describe(ws)}")


@app.command("list")
def list_workspaces(endpoint: EndpointOption = DEFAULT_ENDPOINT) -> None:
    """List workspaces with their plan, limits and current use."""
    from rich.table import Table

    with ApiClient(endpoint) as client:
        workspaces = client.request("GET", "/v1/workspaces").json()["workspaces"]
    table = Table(box=None, header_style="bold")
    # Names are what a user copies: never cut, whatever the terminal's width.
    table.add_column("NAME", no_wrap=True, min_width=max((len(ws["name"]) for ws in workspaces), default=4))
    for column in ("PLAN", "CONCURRENCY", "BURST", "RESERVED", "RUNNING", "CREDIT", "THROTTLES"):
        table.add_column(column, no_wrap=True)
    for ws in workspaces:
        table.add_row(
            ws["name"],
            ws["plan"],
            str(ws["default_concurrency"]),
            str(ws["burst_concurrency"]),
            f"{ws['reserved_total']}/{ws['reserved_cap']}",
            str(ws["concurrent_executions"]),
            f"{ws['burst_credit']}/{ws['burst_credit_max']}",
            str(ws["throttles"]),
        )
    out.print(table)


@app.command("set-plan")
def set_plan(
    name: Annotated[str, typer.Argument(help="Workspace name.")],
    plan: PlanArgument,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Move workspace NAME to PLAN (refused if its reservations exceed the plan's cap)."""
    with ApiClient(endpoint) as client:
        ws = client.request("PUT", f"/v1/workspaces/{name}/plan", json_body={"plan": plan}).json()
    err.print(f"Updated {_describe(ws)}")
