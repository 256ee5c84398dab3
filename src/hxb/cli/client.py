"""ApiClient: the CLI's HTTP client for one hxb server. Turns every failure into a CliError
with one readable line."""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
_INVOKE_PREFIX = "/2015-03-31/functions/"


class CliError(Exception):
    """A failure the CLI reports as one line on stderr, with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _api_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "Message"):
            if key in body:
                code = response.headers.get("x-amzn-errortype")
                return f"{code}: {body[key]}" if code else str(body[key])
    text = response.text.strip()
    return text[:500] or f"HTTP {response.status_code}"


class ApiClient:
    def __init__(self, endpoint: str, *, timeout_s: float | None = 30.0, workspace: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        # Function commands act in HXB_WORKSPACE when it is set, else in the server's default.
        self.workspace = workspace if workspace is not None else os.environ.get("HXB_WORKSPACE") or None
        if not self.endpoint.startswith(("http://", "https://")):
            raise CliError(f"endpoint {endpoint!r} must start with http:// or https://", exit_code=2)
        self._client = httpx.Client(base_url=self.endpoint, timeout=httpx.Timeout(timeout_s, connect=5.0))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | Iterator[bytes] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | object | None = ...,
        ok_statuses: tuple[int, ...] = (),
    ) -> httpx.Response:
        path, params = self._in_workspace(path, params)
        kwargs: dict[str, Any] = {"headers": dict(headers or {}), "params": params}
        if json_body is not None:
            kwargs["content"] = json.dumps(json_body).encode()
            kwargs["headers"]["content-type"] = "application/json"
        elif content is not None:
            kwargs["content"] = content
        if timeout_s is not ...:
            kwargs["timeout"] = httpx.Timeout(timeout_s, connect=5.0)  # type: ignore[arg-type]
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach hxb at {self.endpoint} ({_reason(exc)}): start it with `hxb serve`, "
                "or point --endpoint / HXB_ENDPOINT at it"
            ) from None
        except httpx.TimeoutException:
            raise CliError(f"hxb at {self.endpoint} did not answer {method} {path} in time") from None
        except httpx.HTTPError as exc:
            raise CliError(f"request to {self.endpoint} failed: {exc}") from None
        if response.status_code >= 400 and response.status_code not in ok_statuses:
            raise CliError(_api_message(response))
        return response

    def _in_workspace(self, path: str, params: Mapping[str, Any] | None) -> tuple[str, Mapping[str, Any] | None]:
        """Function paths of the management API get `?workspace=`; the Invoke API gets the
        workspace in the function's name (`WS:function:NAME`, as an ARN's account)."""
        if not self.workspace:
            return path, params
        if path.startswith("/v1/functions"):
            return path, {**(params or {}), "workspace": self.workspace}
        if path.startswith(_INVOKE_PREFIX):
            name = path[len(_INVOKE_PREFIX) :].split("/", 1)[0]
            if ":" not in urllib.parse.unquote(name):
                prefix = urllib.parse.quote(f"{self.workspace}:function:", safe="")
                path = _INVOKE_PREFIX + prefix + path[len(_INVOKE_PREFIX) :]
        return path, params


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text or "ECONNREFUSED" in text:
        return "connection refused"
    return text or type(exc).__name__
