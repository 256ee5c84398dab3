"""Choosing how instances are started: the linux sandbox when this host allows it, else the
local one (no isolation), as `HXB_SANDBOX_MODE` says; never silently."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hxb.config import SandboxSettings
from hxb.errors import SandboxUnavailableError
from hxb.runtimes import RuntimeCatalog
from hxb.sandbox.base import SandboxFactory
from hxb.sandbox.local import LocalSandboxFactory

log = logging.getLogger(__name__)


@dataclass
class SandboxChoice:
    factory: SandboxFactory
    # What is missing or weaker than the full sandbox, one sentence each; empty when complete.
    degraded: list[str] = field(default_factory=list)

    @property
    def isolated(self) -> bool:
        return self.factory.name != "local"


async def open_sandbox(settings: SandboxSettings, data_dir: Path, catalog: RuntimeCatalog) -> SandboxChoice:
    local = LocalSandboxFactory(data_dir / "instances")
    if settings.mode == "local":
        return SandboxChoice(local, ["HXB_SANDBOX_MODE=local: instances run WITHOUT isolation"])
    try:
        from hxb.sandbox.linux import LinuxSandboxFactory

        factory, degraded = await LinuxSandboxFactory.open(settings=settings, data_dir=data_dir, catalog=catalog)
    except SandboxUnavailableError as exc:
        if settings.mode == "linux":
            raise
        return SandboxChoice(local, [f"no sandbox on this host ({exc}): instances run WITHOUT isolation"])
    return SandboxChoice(factory, degraded)
