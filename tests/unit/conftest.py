"""Fixtures shared by the unit tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import hxb

BOOTSTRAP_PATH = Path(hxb.__file__).parent / "bootstraps" / "python" / "_hxb_bootstrap.py"


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[ModuleType]:
    """The Python runtime's bootstrap, imported by path (it is not part of the hxb package's
    import tree: it runs inside instances) under a name that cannot clash."""
    name = "_hxb_bootstrap_under_test"
    spec = importlib.util.spec_from_file_location(name, BOOTSTRAP_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)
