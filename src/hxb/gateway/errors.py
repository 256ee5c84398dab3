"""The one place a PlatformError becomes an HTTP response: in Lambda's error format on the
Invoke API (so boto3 raises the right exception class), in hxb's own on the management API."""

from __future__ import annotations

import json

from hxb.errors import (
    FunctionExistsError,
    FunctionNotFoundError,
    InvalidRequestContentError,
    PlatformError,
    RequestTooLargeError,
    SpecError,
    ThrottledError,
)
from hxb.models import function_arn

JSON = b"application/json"


def _lambda_code(exc: PlatformError) -> str:
    if isinstance(exc, FunctionNotFoundError):
        return "ResourceNotFoundException"
    if isinstance(exc, RequestTooLargeError):
        return "RequestTooLargeException"
    if isinstance(exc, InvalidRequestContentError):
        return "InvalidRequestContentException"
    if isinstance(exc, ThrottledError):
        return "TooManyRequestsException"
    if isinstance(exc, FunctionExistsError):
        return "ResourceConflictException"
    if exc.http_status < 500:
        return "InvalidParameterValueException"
    return "ServiceException"


def lambda_error(
    exc: PlatformError, *, region: str, workspace: str, request_id: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a Lambda API error. botocore reads the error code from
    `x-amzn-ErrorType` and the message from the body's `message`."""
    code = _lambda_code(exc)
    message = exc.message
    if isinstance(exc, FunctionNotFoundError):
        message = f"Function not found: {function_arn(region, workspace, exc.name, exc.qualifier)}"
    elif isinstance(exc, RequestTooLargeError):
        message = f"Request must be smaller than {exc.limit_bytes} bytes for the InvokeFunction operation"
    doc: dict[str, object] = {"Type": "User" if exc.http_status < 500 else "Service", "message": message}
    headers = [
        (b"content-type", JSON),
        (b"x-amzn-errortype", code.encode()),
        (b"x-amzn-requestid", request_id.encode()),
    ]
    if isinstance(exc, ThrottledError):
        doc["Reason"] = "ConcurrentInvocationLimitExceeded"
        headers.append((b"retry-after", str(max(1, round(exc.retry_after_s))).encode()))
    body = json.dumps(doc).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    return exc.http_status, headers, body


def management_error(exc: PlatformError) -> tuple[int, dict[str, object]]:
    """Status and body of a management API (`/v1`) error."""
    error: dict[str, object] = {"type": exc.error_type, "message": exc.message}
    if isinstance(exc, SpecError):
        error["problems"] = list(exc.problems)
    return exc.http_status, {"error": error}
