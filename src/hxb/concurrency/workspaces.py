"""Workspaces: a name and a plan each, kept in the store and mirrored into admission. Every
function belongs to one; `hxb serve` makes sure `default` exists."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final

from hxb.concurrency.admission import Admission
from hxb.concurrency.plans import Plan, plan_named
from hxb.errors import ClientError, WorkspaceExistsError, WorkspaceNotFoundError
from hxb.store import Store, WorkspaceRecord

# The account part of ARNs: the same rule as function names.
_NAME_PATTERN: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")

PlanChanged = Callable[[str, Plan], Awaitable[None]]


def check_workspace_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise ClientError(
            f"workspace name {name!r} must be 1 to 64 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


class Workspaces:
    def __init__(self, store: Store, admission: Admission) -> None:
        self._store = store
        self._admission = admission
        self._plans: dict[str, WorkspaceRecord] = {}
        self._lock = asyncio.Lock()
        self._listeners: list[PlanChanged] = []

    def on_plan_changed(self, listener: PlanChanged) -> None:
        """`listener(workspace, plan)` runs after a plan change (provisioned counts follow it)."""
        self._listeners.append(listener)

    async def load(self, default_workspace: str, default_plan: str) -> None:
        """Reads every workspace; creates `default_workspace` on `default_plan` if missing."""
        for record in await self._store.list_workspaces():
            self._plans[record.name] = record
            self._admission.set_plan(record.name, plan_named(record.plan))
        if default_workspace not in self._plans:
            await self.create(default_workspace, default_plan)

    async def create(self, name: str, plan: str) -> WorkspaceRecord:
        check_workspace_name(name)
        chosen = plan_named(plan)
        async with self._lock:
            if name in self._plans:
                raise WorkspaceExistsError(name)
            record = WorkspaceRecord(name=name, plan=chosen.name, created_at=_now_iso())
            await self._store.put_workspace(record)
            self._plans[name] = record
            self._admission.set_plan(name, chosen)
        return record

    async def set_plan(self, name: str, plan: str) -> WorkspaceRecord:
        chosen = plan_named(plan)
        async with self._lock:
            current = self.get(name)
            self._admission.check_plan(name, chosen)  # before the store: a refused change changes nothing
            record = WorkspaceRecord(name=name, plan=chosen.name, created_at=current.created_at)
            await self._store.put_workspace(record)
            self._plans[name] = record
            self._admission.set_plan(name, chosen)
        for listener in self._listeners:
            await listener(name, chosen)
        return record

    def get(self, name: str) -> WorkspaceRecord:
        record = self._plans.get(name)
        if record is None:
            raise WorkspaceNotFoundError(name)
        return record

    def plan_of(self, name: str) -> Plan:
        return plan_named(self.get(name).plan)

    def list(self) -> list[WorkspaceRecord]:
        return [self._plans[name] for name in sorted(self._plans)]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
