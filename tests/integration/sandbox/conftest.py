"""Sandbox tests need root (namespaces, cgroups, loop devices, nftables). CI runs as root with
everything installed; elsewhere they are skipped, loudly."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/sandbox/" in str(item.path):
            item.add_marker(pytest.mark.sandbox)
            if os.geteuid() != 0:
                if os.environ.get("CI", "").lower() == "true":
                    # CI runs as root: the full sandbox is what it must test, never skip.
                    raise pytest.UsageError("CI=true but not root: the sandbox tests need root")
                item.add_marker(pytest.mark.skip(reason="sandbox tests need root"))
