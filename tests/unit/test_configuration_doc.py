"""docs/configuration.md lists every setting with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from hxb.config import settings_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _documented() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| `(HXB_[A-Z_]+)` \|[^|]*\| ([^|]+) \|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_every_setting_is_documented_with_its_default() -> None:
    documented = _documented()
    for env_var, default, _section in settings_table():
        assert env_var in documented, f"{env_var} missing from docs/configuration.md"
        shown = documented[env_var].strip("`")
        expected = default.strip("'")
        if expected in ("", "()"):
            assert shown == "(empty)", env_var
        elif expected.startswith("PosixPath("):
            assert shown == expected[len("PosixPath('") : -2], env_var
        else:
            assert shown == expected, env_var


def test_the_doc_lists_no_setting_that_does_not_exist() -> None:
    known = {row[0] for row in settings_table()}
    assert set(_documented()) <= known
