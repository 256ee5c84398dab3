"""Router: function name and qualifier to the revision that serves it. In memory, so that the
invoke path never touches the store; the registry keeps it in step with the store."""

from __future__ import annotations

from hxb.errors import FunctionNotFoundError
from hxb.models import LATEST, FunctionRevision


class Router:
    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], FunctionRevision] = {}

    def resolve(self, workspace: str, name: str, qualifier: str | None = None) -> FunctionRevision:
        revision = self._latest.get((workspace, name))
        if revision is None:
            raise FunctionNotFoundError(name, qualifier)
        if qualifier not in (None, "", LATEST):
            # Published versions and aliases do not exist yet: only $LATEST resolves.
            raise FunctionNotFoundError(name, qualifier)
        return revision

    def get(self, workspace: str, name: str) -> FunctionRevision | None:
        return self._latest.get((workspace, name))

    def put(self, revision: FunctionRevision) -> FunctionRevision | None:
        """Routes `name` to `revision`; returns the revision it replaces, if any."""
        key = (revision.workspace, revision.name)
        previous = self._latest.get(key)
        self._latest[key] = revision
        return previous

    def remove(self, workspace: str, name: str) -> FunctionRevision | None:
        return self._latest.pop((workspace, name), None)

    def list(self, workspace: str | None = None) -> list[FunctionRevision]:
        revisions = [r for (ws, _), r in self._latest.items() if workspace is None or ws == workspace]
        return sorted(revisions, key=lambda r: (r.workspace, r.name))
