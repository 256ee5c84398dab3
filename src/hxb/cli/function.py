"""`hxb function ...`: deploy, invoke, list, get, delete and read the logs of functions."""

from __future__ import annotations

import base64
import json
import re
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from hxb.cli.client import DEFAULT_ENDPOINT, ApiClient, CliError

if TYPE_CHECKING:
    from rich.progress import Progress

# Heavier modules (pydantic through hxb.spec, the zip packer, rich's progress bars) are
# imported by the commands that need them: `hxb function invoke` should start fast.

app = typer.Typer(help="Deploy, invoke and inspect functions.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EndpointOption = Annotated[
    str, typer.Option("--endpoint", envvar="HXB_ENDPOINT", help="URL of the hxb server.", show_default=True)
]
_UPLOAD_CHUNK = 256 * 1024
_LOG_POLL_S = 0.5


def _config_path(directory: Path) -> Path:
    for name in ("hexabase.yaml", "hexabase.yml"):
        if (directory / name).is_file():
            return directory / name
    raise CliError(f"{directory}: no hexabase.yaml here (create one with at least `function:` and `name:`)")


@app.command()
def deploy(
    directory: Annotated[Path, typer.Argument(help="The function's directory (with hexabase.yaml).")] = Path("."),
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Zip DIRECTORY (honouring .hxbignore) and deploy it. Returns once the function can be invoked."""
    from hxb.errors import PackageError, SpecError
    from hxb.packaging import pack_directory
    from hxb.spec import load_function_file

    if not directory.is_dir():
        raise CliError(f"{directory}: not a directory")
    try:
        config = load_function_file(_config_path(directory))
    except SpecError as exc:
        raise CliError(str(exc)) from None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hxb-deploy-") as tmp:
        zip_path = Path(tmp) / f"{config.name}.zip"
        with _progress() as progress:
            task = progress.add_task("packing", total=None)

            def packed(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            try:
                result = pack_directory(directory, zip_path, progress=packed)
            except PackageError as exc:
                raise CliError(str(exc)) from None
            upload = progress.add_task("uploading", total=result.zipped_bytes)
            with ApiClient(endpoint, timeout_s=600.0) as client:
                response = client.request(
                    "PUT",
                    f"/v1/functions/{config.name}",
                    content=_chunks(zip_path, lambda n: progress.advance(upload, n)),
                    headers={"content-type": "application/zip", "content-length": str(result.zipped_bytes)},
                )
    view = response.json()
    verb = "Created" if response.status_code == 201 else "Updated"
    elapsed = time.perf_counter() - started
    err.print(
        f"{verb} [bold]{view['name']}[/] ({view['version']}, {view['runtime']}, {view['memory']} MB, "
        f"{result.file_count} files, {result.zipped_bytes / 1024:.1f} KiB) in {elapsed:.1f}s"
    )
    out.print(f"  hxb function invoke {view['name']} --payload '{{}}'", highlight=False)
    out.print(f"  curl {endpoint.rstrip('/')}/fn/{view['name']}", highlight=False)


def _progress() -> Progress:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def _chunks(path: Path, advance: Any) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(_UPLOAD_CHUNK):
            advance(len(chunk))
            yield chunk


def _read_payload(payload: str | None) -> bytes:
    if payload is None:
        return b"{}"
    if payload == "-":
        data = sys.stdin.buffer.read()
    elif payload.startswith("@"):
        path = Path(payload[1:])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CliError(f"--payload {payload}: cannot read {path} ({exc.strerror})") from None
    else:
        data = payload.encode()
    try:
        json.loads(data or b"{}")
    except ValueError as exc:
        raise CliError(f"--payload is not valid JSON: {exc}") from None
    return data


@app.command()
def invoke(
    name: Annotated[str, typer.Argument(help="Function name.")],
    payload: Annotated[
        str | None, typer.Option("--payload", "-p", help="Event: JSON text, @FILE, or - for stdin.")
    ] = None,
    log: Annotated[bool, typer.Option("--log", help="Print the invocation's log (last 4 KB) to stderr.")] = False,
    qualifier: Annotated[str | None, typer.Option("--qualifier", help="Version or alias.")] = None,
    async_: Annotated[
        bool,
        typer.Option(
            "--async", help="Queue the event (retried on failure) and print its request id instead of waiting."
        ),
    ] = False,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Invoke NAME synchronously and print its result. Exits 1 if the function fails."""
    body = _read_payload(payload)
    if async_:
        if log:
            raise CliError("--log needs a synchronous invocation: read an event's log with `hxb function logs`")
        _invoke_async(name, body, qualifier, endpoint)
        return
    headers = {"content-type": "application/json", "x-amz-invocation-type": "RequestResponse"}
    if log:
        headers["x-amz-log-type"] = "Tail"
    params = {"Qualifier": qualifier} if qualifier else None
    with ApiClient(endpoint, timeout_s=None) as client:
        response = client.request(
            "POST",
            f"/2015-03-31/functions/{urllib.parse.quote(name, safe='')}/invocations",
            content=body,
            headers=headers,
            params=params,
        )
    if log and "x-amz-log-result" in response.headers:
        tail = base64.b64decode(response.headers["x-amz-log-result"]).decode("utf-8", errors="replace")
        err.print(tail.rstrip("\n"), markup=False, highlight=False)
    sys.stdout.write(response.text + ("\n" if not response.text.endswith("\n") else ""))
    sys.stdout.flush()
    if "x-amz-function-error" in response.headers:
        try:
            doc = response.json()
            reason = f"{doc.get('errorType', 'Error')}: {doc.get('errorMessage', '')}"
        except (ValueError, AttributeError):
            reason = "the function failed"
        raise CliError(f"function {name!r} failed: {reason}")


def _invoke_async(name: str, body: bytes, qualifier: str | None, endpoint: str) -> None:
    with ApiClient(endpoint) as client:
        response = client.request(
            "POST",
            f"/2015-03-31/functions/{urllib.parse.quote(name, safe='')}/invocations",
            content=body,
            headers={"content-type": "application/json", "x-amz-invocation-type": "Event"},
            params={"Qualifier": qualifier} if qualifier else None,
        )
    # The request id is what `hxb function logs NAME --invocation ID` and the dead-letter
    # list know the event by: alone on stdout, so that scripts can capture it.
    sys.stdout.write(response.headers.get("x-amzn-requestid", "") + "\n")
    sys.stdout.flush()
    err.print(f"Queued an event for {name}")


@app.command("list")
def list_functions(endpoint: EndpointOption = DEFAULT_ENDPOINT) -> None:
    """List the deployed functions."""
    from rich.table import Table

    with ApiClient(endpoint) as client:
        functions = client.request("GET", "/v1/functions").json()["functions"]
    if not functions:
        err.print("no functions yet: deploy one with `hxb function deploy DIR`")
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "RUNTIME", "MEMORY", "TIMEOUT", "INSTANCES", "LAST MODIFIED"):
        table.add_column(column)
    for fn in functions:
        inst = fn["instances"]
        table.add_row(
            fn["name"],
            fn["runtime"],
            f"{fn['memory']} MB",
            f"{fn['timeout']} s",
            f"{inst['idle']} idle, {inst['busy']} busy",
            fn["last_modified"],
        )
    out.print(table)


@app.command()
def get(name: Annotated[str, typer.Argument()], endpoint: EndpointOption = DEFAULT_ENDPOINT) -> None:
    """Show NAME's configuration and state as JSON."""
    with ApiClient(endpoint) as client:
        view = client.request("GET", f"/v1/functions/{name}").json()
    out.print_json(data=view)


@app.command()
def delete(name: Annotated[str, typer.Argument()], endpoint: EndpointOption = DEFAULT_ENDPOINT) -> None:
    """Delete NAME, stop its instances and drop its logs."""
    with ApiClient(endpoint) as client:
        client.request("DELETE", f"/v1/functions/{name}")
    err.print(f"Deleted {name}")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")


def parse_since(value: str, now_s: float) -> int:
    """`30s`, `10m`, `2h`, `1d` ago, or an ISO 8601 time -> epoch milliseconds."""
    match = _DURATION.match(value.strip())
    if match:
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return int((now_s - float(match.group(1)) * scale) * 1000)
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--since {value!r}: expected a duration (30s, 10m, 2h, 1d) or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# Control characters other than tab and newline: a function's output must not drive the
# operator's terminal (escape sequences can retitle, recolour or hide text).
_CONTROL = frozenset([*range(0x09), *range(0x0B, 0x20), 0x7F])


def _format_event(event: dict[str, Any], *, raw: bool) -> str:
    stamp = datetime.fromtimestamp(event["timestamp_ms"] / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    message: str = event["message"]
    if not raw:
        message = "".join(f"\\x{ord(c):02x}" if ord(c) in _CONTROL else c for c in message)
    return f"{stamp} {message}"


@app.command()
def logs(
    name: Annotated[str, typer.Argument()],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    since: Annotated[str | None, typer.Option("--since", help="Only events newer than 10m, 2h, ... or a time.")] = None,
    invocation: Annotated[str | None, typer.Option("--invocation", help="Only this invocation's events.")] = None,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Print NAME's log events, oldest first."""
    params: dict[str, Any] = {"limit": 1000}
    if since:
        params["since_ms"] = parse_since(since, time.time())
    if invocation:
        params["invocation_id"] = invocation
    with ApiClient(endpoint) as client:
        try:
            while True:
                page = client.request("GET", f"/v1/functions/{name}/logs", params=params).json()
                raw = not sys.stdout.isatty()  # piped output stays exact
                for event in page["events"]:
                    sys.stdout.write(_format_event(event, raw=raw) + "\n")
                sys.stdout.flush()
                if page["next_after_id"] is not None:
                    params["after_id"] = page["next_after_id"]
                if len(page["events"]) >= params["limit"]:
                    continue
                if not follow:
                    return
                time.sleep(_LOG_POLL_S)
        except KeyboardInterrupt:
            return


# --- dead letters -----------------------------------------------------------------------------------

dlq_app = typer.Typer(
    help="A function's dead-letter list: asynchronous events whose retries ran out.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


def _dlq_path(name: str, *rest: str) -> str:
    parts = [urllib.parse.quote(p, safe="") for p in (name, "dlq", *rest)]
    return "/v1/functions/" + "/".join(parts)


@dlq_app.command("list")
def dlq_list(
    name: Annotated[str, typer.Argument(help="Function name.")],
    limit: Annotated[int, typer.Option("--limit", help="At most this many, oldest first.")] = 100,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """List NAME's dead-lettered events, oldest first."""
    with ApiClient(endpoint) as client:
        letters = client.request("GET", _dlq_path(name), params={"limit": limit}).json()["dead_letters"]
    if not letters:
        err.print(f"no dead letters for {name}")
        return
    # Plain columns, not a table that wraps: an event id is what a script cuts out of a line.
    sys.stdout.write(f"{'EVENT ID':<36}  {'DEAD AT':<24}  ATTEMPTS  {'REASON':<16}  ERROR TYPE\n")
    for letter in letters:
        sys.stdout.write(
            f"{letter['event_id']:<36}  {letter['dead_at'] or '':<24}  {letter['attempts']:>8}  "
            f"{letter['reason'] or '':<16}  {letter['error_type'] or ''}\n"
        )
    sys.stdout.flush()


@dlq_app.command("show")
def dlq_show(
    name: Annotated[str, typer.Argument(help="Function name.")],
    event_id: Annotated[str, typer.Argument(help="The event's request id.")],
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Show one dead-lettered event as JSON: its payload, last error and attempts."""
    with ApiClient(endpoint) as client:
        letter = client.request("GET", _dlq_path(name, event_id)).json()
    sys.stdout.write(json.dumps(letter, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@dlq_app.command("redrive")
def dlq_redrive(
    name: Annotated[str, typer.Argument(help="Function name.")],
    event_ids: Annotated[list[str] | None, typer.Argument(help="Event ids; none: every dead letter.")] = None,
    endpoint: EndpointOption = DEFAULT_ENDPOINT,
) -> None:
    """Queue dead-lettered events of NAME again, as new events (attempts and age start over)."""
    body = {"event_ids": event_ids} if event_ids else None
    with ApiClient(endpoint) as client:
        redriven = client.request("POST", _dlq_path(name, "redrive"), json_body=body).json()["redriven"]
    for event_id in redriven:
        sys.stdout.write(event_id + "\n")
    sys.stdout.flush()
    err.print(f"Redrove {len(redriven)} event{'s' if len(redriven) != 1 else ''} of {name}")
