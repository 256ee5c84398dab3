"""Shared helpers of the e2e tier: run the real `hxb` command, lay out function directories, and
check the CLI's one-line error contract."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from typing import Any

from tests.conftest import HXB, function_yaml, server_env

# Generous: a cold start plus the CLI's own start; a hang still fails well before pytest-timeout.
CLI_TIMEOUT_S = 45.0


def run_hxb(
    *args: str,
    env_endpoint: str | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout_s: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Runs `hxb ARGS` as a user would; `env_endpoint` becomes HXB_ENDPOINT (no HXB_* leaks in)."""
    env = server_env(**({"HXB_ENDPOINT": env_endpoint} if env_endpoint else {}))
    return subprocess.run(
        [HXB, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout_s,
        check=False,
    )


def write_function(directory: Path, name: str, files: dict[str, str], **config: Any) -> Path:
    """A function directory: hexabase.yaml for `name` (with `config`) and `files` (dedented)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hexabase.yaml").write_text(function_yaml(name, **config))
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))
    return directory


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """What an assertion message shows of a CLI run."""
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The CLI failed with one `error: ...` line on stderr, no traceback, naming every needle."""
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith("error: "), describe(result)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the error line\n{describe(result)}"
    return lines[0]
