"""`hxb function concurrency ...`: a function's reserved concurrency."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from hxb.cli.client import DEFAULT_ENDPOINT, ApiClient

app = typer.Typer(help="Reserved concurrency of a function.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EndpointOption = Annotated[
    str, typer.Option("--endpoint", envvar="HXB_ENDPOINT", help="URL of the hxb server.", show_default=True)
]


@app.command("set")
def set_concurrency(
    name: Annotated[str, typer.Argument(help="Function name.")],
    reserved: Annotated[int, typer.Argument(min=0, help="Concurrent executions reserved; 0 throttles NAME.")],
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Reserve concurrency for NAME: it caps NAME and is taken from the workspace's pool."""
    with ApiClient(endpoint) as client:
        view = client.request(
            "PUT", f"/v1/functions/{name}/concurrency", json_body={"reserved_concurrency": reserved}
        ).json()
    err.print(f"{name}: reserved concurrency {view['reserved_concurrency']}")


@app.command("get")
def get_concurrency(
    name: Annotated[str, typer.Argument(help="Function name.")], endpoint: EndpointOption = DEFAULT_ENDPOINT
) -> None:
    """Show NAME's reservation, concurrent executions and throttles."""
    with ApiClient(endpoint) as client:
        view = client.request("GET", f"/v1/functions/{name}/concurrency").json()
    out.print_json(data=view)


@app.command("delete")
def delete_concurrency(
    name: Annotated[str, typer.Argument(help="Function name.")], endpoint: EndpointOption = DEFAULT_ENDPOINT
) -> None:
    """Remove NAME's reservation: it shares the workspace's unreserved pool again."""
    with ApiClient(endpoint) as client:
        client.request("DELETE", f"/v1/functions/{name}/concurrency")
    err.print(f"{name}: no reserved concurrency")
