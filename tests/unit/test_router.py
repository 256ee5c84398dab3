"""Router: name and qualifier to the revision that serves it, per workspace."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hxb.errors import FunctionNotFoundError
from hxb.models import LATEST, FunctionRevision
from hxb.router import Router
from hxb.runtimes import RuntimeInfo
from hxb.spec import FunctionConfig

RUNTIME = RuntimeInfo(name="python3.11", family="python", version="3.11.2", executable=Path(sys.executable))


def revision(name: str, *, workspace: str = "default", revision_id: str = "r1") -> FunctionRevision:
    return FunctionRevision(
        workspace=workspace,
        name=name,
        version=LATEST,
        revision_id=revision_id,
        config=FunctionConfig(name=name),
        code_dir=Path("/code") / name,
        code_sha256="0" * 64,
        code_size_bytes=0,
        runtime=RUNTIME,
        region="local",
        last_modified="2024-01-01T00:00:00Z",
    )


@pytest.mark.parametrize("qualifier", [None, "", LATEST])
def test_resolve_finds_the_latest_revision(qualifier: str | None) -> None:
    router = Router()
    rev = revision("echo")
    router.put(rev)

    assert router.resolve("default", "echo", qualifier) is rev


def test_resolve_unknown_function_is_not_found() -> None:
    router = Router()
    router.put(revision("echo"))

    with pytest.raises(FunctionNotFoundError, match="'ohce' not found") as caught:
        router.resolve("default", "ohce")

    assert caught.value.http_status == 404


@pytest.mark.parametrize("qualifier", ["1", "prod"])
def test_resolve_versions_and_aliases_are_not_found_yet(qualifier: str) -> None:
    router = Router()
    router.put(revision("echo"))

    with pytest.raises(FunctionNotFoundError, match=f"'echo:{qualifier}' not found"):
        router.resolve("default", "echo", qualifier)


def test_resolve_keeps_workspaces_apart() -> None:
    router = Router()
    mine = revision("echo", workspace="mine")
    router.put(mine)

    assert router.resolve("mine", "echo") is mine
    with pytest.raises(FunctionNotFoundError):
        router.resolve("theirs", "echo")


def test_put_replaces_and_returns_the_previous_revision() -> None:
    router = Router()
    old, new = revision("echo", revision_id="r1"), revision("echo", revision_id="r2")

    assert router.put(old) is None
    assert router.put(new) is old
    assert router.resolve("default", "echo") is new
    assert router.get("default", "echo") is new


def test_remove_returns_the_revision_and_forgets_it() -> None:
    router = Router()
    rev = revision("echo")
    router.put(rev)

    assert router.remove("default", "echo") is rev
    assert router.remove("default", "echo") is None
    assert router.get("default", "echo") is None
    with pytest.raises(FunctionNotFoundError):
        router.resolve("default", "echo")


def test_list_is_sorted_and_filtered_by_workspace() -> None:
    router = Router()
    for ws, name in [("b", "zeta"), ("a", "beta"), ("b", "alpha"), ("a", "alpha")]:
        router.put(revision(name, workspace=ws))

    assert [(r.workspace, r.name) for r in router.list()] == [
        ("a", "alpha"),
        ("a", "beta"),
        ("b", "alpha"),
        ("b", "zeta"),
    ]
    assert [r.name for r in router.list("b")] == ["alpha", "zeta"]
    assert router.list("c") == []
