"""`missing`: a test that needs what the host lacks is skipped on a laptop, failed under CI."""

from __future__ import annotations

import pytest

from tests.conftest import missing


def test_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        missing("no frobnicator")


def test_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no frobnicator, and CI must provide it"):
        missing("no frobnicator")
