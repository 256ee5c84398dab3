"""The platform's core records: a deployed function revision, an invocation and its result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hxb.logs.records import log_group_name
from hxb.runtimes import RuntimeInfo
from hxb.spec import FunctionConfig

LATEST = "$LATEST"


def function_arn(region: str, workspace: str, name: str, qualifier: str | None = None) -> str:
    base = f"arn:hxb:lambda:{region}:{workspace}:function:{name}"
    return f"{base}:{qualifier}" if qualifier else base


@dataclass(frozen=True, slots=True, kw_only=True)
class FunctionRevision:
    """One runnable state of a function: its config and code as deployed. Every deploy or
    configuration change makes a new revision; instances belong to exactly one."""

    workspace: str
    name: str
    version: str
    revision_id: str
    config: FunctionConfig
    code_dir: Path
    code_sha256: str
    code_size_bytes: int
    runtime: RuntimeInfo
    region: str
    last_modified: str

    @property
    def key(self) -> str:
        return f"{self.workspace}/{self.name}:{self.version}#{self.revision_id}"

    @property
    def arn(self) -> str:
        return function_arn(self.region, self.workspace, self.name)

    @property
    def log_group(self) -> str:
        return log_group_name(self.workspace, self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class InvocationRequest:
    invocation_id: str
    payload: bytes
    invoked_arn: str
    client_context: Mapping[str, Any] | None = None
    identity: Mapping[str, Any] | None = None
    want_log_tail: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class InvocationResult:
    invocation_id: str
    payload: bytes
    function_error: bool
    executed_version: str
    duration_ms: float
    init_duration_ms: float | None = None
    log_tail: str | None = None
    error_type: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
