"""`hxb doctor`, and `hxb serve` choosing its sandbox: the full one as root, a loudly labelled
degraded mode (no isolation) where the host does not allow it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HXB, HxbServer, server_env
from tests.e2e._helpers import run_hxb

FEATURES = ("root", "mount namespace", "pid namespace", "network namespace", "cgroups", "seccomp", "outbound NAT")


@pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox needs root")
def test_doctor_as_root_reports_every_feature_present() -> None:
    result = run_hxb("doctor")

    assert result.returncode == 0, result.stdout + result.stderr
    for feature in FEATURES:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(feature))
        assert " ok " in f" {line} ", line
    assert "full isolation" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_doctor_as_an_unprivileged_user_says_what_is_missing() -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", HXB, "doctor"],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=60,
        check=False,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "MISSING" in result.stdout
    assert "run `hxb serve` as root" in result.stdout
    assert "no sandbox on this host" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox needs root")
def test_serve_as_root_runs_the_linux_sandbox(hxb_server_factory: Any) -> None:
    server: HxbServer = hxb_server_factory()
    banner = "".join(server.output)

    assert "sandbox: linux" in banner
    assert "WARNING" not in banner


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_serve_without_root_warns_loudly_and_runs_without_isolation() -> None:
    # pytest's tmp_path lies under a directory only root may enter: a place `nobody` can use.
    home = Path(tempfile.mkdtemp(prefix="hxb-nobody-"))
    data_dir = home / "data"
    data_dir.mkdir()
    os.chown(home, 65534, 65534)
    os.chown(data_dir, 65534, 65534)
    proc = subprocess.Popen(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            HXB,
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=server_env(HOME=str(home)),
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        banner = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if line.lstrip().startswith("(`hxb doctor`"):
                break
        text = "".join(banner)
        assert "hxb listening on" in text, text
        endpoint = next(line.split()[-1] for line in banner if line.startswith("hxb listening on"))
        assert "sandbox: local" in text
        assert "WARNING: no sandbox on this host" in text
        assert "WITHOUT isolation" in text
        with httpx.Client(base_url=endpoint, timeout=10) as c:
            assert c.get("/v1/health").json()["sandbox"] == "local"
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(home, ignore_errors=True)
