"""The whole exception hierarchy of hxb. A leaf module: it imports nothing from hxb.

Every expected failure is a `PlatformError` whose `error_type` prefix says who is at fault:
`Client.*` (bad request), `Function.*` (user code raised), `Runtime.*` (the bootstrap crashed,
failed init or sent a bad response), `Sandbox.*` (we failed to spawn, limit or time out) and
`Platform.*` (config, store or bus unavailable). A bug is `InternalError`, deliberately not a
`PlatformError`, so that no handler mistakes it for an expected condition.
"""

from __future__ import annotations

from typing import ClassVar


class PlatformError(Exception):
    """Root of the hierarchy. `error_type` is stable: it goes on the wire and into logs."""

    error_type: ClassVar[str] = "Platform.Unknown"
    http_status: ClassVar[int] = 500

    @property
    def message(self) -> str:
        return str(self)


# --- Client.*: the caller sent something wrong -------------------------------------------------


class ClientError(PlatformError):
    error_type = "Client.BadRequest"
    http_status = 400


class SpecError(ClientError):
    """A `hexabase.yaml` (or a configuration body) that does not validate."""

    error_type = "Client.InvalidFunctionConfig"

    def __init__(self, message: str, *, source: str = "hexabase.yaml", problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.source = source
        self.problems = problems or (message,)


class PackageError(ClientError):
    """A deployment package (zip) that is malformed or unsafe to unpack."""

    error_type = "Client.InvalidPackage"


class PackageTooLargeError(PackageError):
    error_type = "Client.PackageTooLarge"
    http_status = 413


class RuntimeNotAvailableError(ClientError):
    error_type = "Client.RuntimeNotAvailable"


class FunctionNotFoundError(ClientError):
    error_type = "Client.FunctionNotFound"
    http_status = 404

    def __init__(self, name: str, qualifier: str | None = None) -> None:
        shown = f"{name}:{qualifier}" if qualifier else name
        super().__init__(f"function {shown!r} not found")
        self.name = name
        self.qualifier = qualifier


class WorkspaceNotFoundError(ClientError):
    error_type = "Client.WorkspaceNotFound"
    http_status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"workspace {name!r} not found (hxb workspace list shows them, hxb workspace create adds one)")
        self.name = name


class WorkspaceExistsError(ClientError):
    error_type = "Client.WorkspaceExists"
    http_status = 409

    def __init__(self, name: str) -> None:
        super().__init__(f"workspace {name!r} already exists")
        self.name = name


class FunctionExistsError(ClientError):
    error_type = "Client.FunctionExists"
    http_status = 409

    def __init__(self, name: str) -> None:
        super().__init__(f"function {name!r} already exists")
        self.name = name


class RequestTooLargeError(ClientError):
    error_type = "Client.RequestTooLarge"
    http_status = 413

    def __init__(self, what: str, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(f"{what} is {size_bytes} bytes, over the limit of {limit_bytes} bytes")
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class InvalidRequestContentError(ClientError):
    error_type = "Client.InvalidRequestContent"


class UnsupportedOperationError(ClientError):
    error_type = "Client.Unsupported"


class ThrottledError(ClientError):
    """Admission refused: a concurrency or capacity limit is reached."""

    error_type = "Client.Throttled"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- Invocation failures: reported to the caller as a function error ---------------------------


class InvocationError(PlatformError):
    """A failure of one invocation that Lambda reports as a function error (HTTP 200 +
    `X-Amz-Function-Error: Unhandled`), not as an API error."""

    error_type = "Runtime.Unknown"
    http_status = 502

    @property
    def wire_type(self) -> str:
        """The `errorType` the caller sees in the error document."""
        return self.error_type

    def to_document(self) -> dict[str, object]:
        """Lambda's error document, as the caller of the invocation receives it."""
        doc: dict[str, object] = {"errorMessage": self.message, "errorType": self.wire_type}
        stack = getattr(self, "stack_trace", ())
        if stack:
            doc["stackTrace"] = list(stack)
        return doc


class FunctionInitError(InvocationError):
    """The runtime reported that init failed (import error, missing handler, exception at import)."""

    def __init__(self, error_type: str, message: str, stack_trace: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reported_type = error_type
        self.stack_trace = stack_trace

    @property
    def wire_type(self) -> str:
        return self.reported_type


class RuntimeExitError(InvocationError):
    error_type = "Runtime.ExitError"

    def __init__(self, invocation_id: str, exit_description: str) -> None:
        prefix = f"RequestId: {invocation_id} Error: " if invocation_id else ""
        super().__init__(f"{prefix}Runtime exited with error: {exit_description}")
        self.invocation_id = invocation_id
        self.exit_description = exit_description


class RuntimeOutOfMemoryError(RuntimeExitError):
    """The instance was killed for reaching its memory limit."""

    error_type = "Runtime.OutOfMemory"


class RuntimeProtocolError(InvocationError):
    """The bootstrap sent something that is not a valid frame: the instance is not trusted again."""

    error_type = "Runtime.InvalidResponse"


class ResponseTooLargeError(InvocationError):
    error_type = "Function.ResponseSizeTooLarge"

    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(
            f"Response payload size ({size_bytes} bytes) exceeded maximum allowed payload size ({limit_bytes} bytes)."
        )
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class SandboxTimeoutError(InvocationError):
    error_type = "Sandbox.Timedout"
    http_status = 504

    def __init__(self, invocation_id: str, timeout_s: float) -> None:
        super().__init__(f"RequestId: {invocation_id} Error: Task timed out after {timeout_s:.2f} seconds")
        self.invocation_id = invocation_id
        self.timeout_s = timeout_s


class InitTimeoutError(InvocationError):
    error_type = "Sandbox.Timedout"
    http_status = 504

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"Init phase timed out after {timeout_s:.2f} seconds")
        self.timeout_s = timeout_s


class SandboxSpawnError(InvocationError):
    error_type = "Sandbox.SpawnFailed"
    http_status = 500


# --- Platform.*: we are misconfigured or a backend is down -------------------------------------


class ConfigError(PlatformError):
    error_type = "Platform.Config"


class StoreError(PlatformError):
    error_type = "Platform.Store"


class DataDirInUseError(PlatformError):
    """Another `hxb serve` runs on this data dir: two platforms would take each other's
    instances, code and sandbox objects."""

    error_type = "Platform.DataDirInUse"


class SandboxUnavailableError(PlatformError):
    """An isolation feature this host lacks (no root, no cgroup controller, no loop device...);
    the message names what is missing and, when it is obvious, how to get it."""

    error_type = "Platform.SandboxUnavailable"


class InternalError(Exception):
    """A broken invariant inside hxb: a bug. Deliberately *not* a PlatformError."""
