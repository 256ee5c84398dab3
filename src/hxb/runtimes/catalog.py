"""The runtime catalog: discovers the CPython interpreters of this host and prepares the hxb
Python bootstrap for each of them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hxb._subprocess import run_process
from hxb.errors import RuntimeNotAvailableError

log = logging.getLogger(__name__)

MIN_PYTHON = (3, 7)
BOOTSTRAP_MODULE = "_hxb_bootstrap"
_PYTHON_NAME = re.compile(r"^python3\.(\d+)$")
# Asked of each candidate interpreter once; the answer is cached by path, size and mtime.
_PROBE = "import sys;print(sys.implementation.name, '.'.join(map(str, sys.version_info[:3])))"


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """One runtime this host can run, e.g. `python3.11` at `/usr/bin/python3.11`."""

    name: str
    family: str
    version: str
    executable: Path

    def instance_argv(self, runtime_dir: str) -> tuple[str, ...]:
        """The command that starts an instance; `runtime_dir` is where the bootstrap is, as
        the instance sees it. `-I -S`: no user site, no site-packages, no PYTHON* env vars,
        so an instance sees only the standard library, its code and its layers."""
        if self.family != "python":
            raise RuntimeNotAvailableError(f"runtime {self.name!r} has no instance command yet")
        code = f"import sys;sys.path.insert(0,{runtime_dir!r});import {BOOTSTRAP_MODULE} as b;b.main()"
        return (str(self.executable), "-I", "-S", "-u", "-c", code)


def _candidate_dirs(extra: Sequence[str]) -> list[Path]:
    dirs: list[Path] = [Path(p) for p in extra]
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve().parent
    dirs += [base, Path("/usr/bin"), Path("/usr/local/bin")]
    for root in {os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")}:
        if root:
            dirs += sorted(_glob_quietly(Path(root), "versions/*/bin"))
    seen: set[Path] = set()
    unique: list[Path] = []
    for d in dirs:
        if d not in seen and _is_dir(d) and "shims" not in d.parts:
            seen.add(d)
            unique.append(d)
    return unique


def _is_dir(path: Path) -> bool:
    # A directory this user may not look into (another user's pyenv) is simply not a candidate.
    try:
        return path.is_dir()
    except OSError:
        return False


def _glob_quietly(root: Path, pattern: str) -> list[Path]:
    try:
        return list(root.glob(pattern))
    except OSError:
        return []


def _candidates(dirs: Iterable[Path]) -> list[tuple[int, Path]]:
    found: list[tuple[int, Path]] = []
    for d in dirs:
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = _PYTHON_NAME.match(entry.name)
            if match and os.access(entry, os.X_OK):
                found.append((int(match.group(1)), entry))
    return found


class RuntimeCatalog:
    """The runtimes of this host. Discovery runs once, at startup (`discover`)."""

    def __init__(self, runtimes: Sequence[RuntimeInfo], bootstrap_root: Path) -> None:
        self._runtimes = {r.name: r for r in runtimes}
        self._bootstrap_root = bootstrap_root
        self._compiled: set[str] = set()
        self._compile_lock = asyncio.Lock()

    @classmethod
    async def discover(cls, data_dir: Path, extra_paths: Sequence[str] = ()) -> RuntimeCatalog:
        cache_file = data_dir / "runtimes.json"
        cache = _read_cache(cache_file)
        runtimes: dict[str, RuntimeInfo] = {}
        fresh: dict[str, list[str | int]] = {}
        for minor, path in _candidates(_candidate_dirs(extra_paths)):
            name = f"python3.{minor}"
            if name in runtimes or (3, minor) < MIN_PYTHON:
                continue
            real = path.resolve()
            st = real.stat()
            key = str(real)
            cached = cache.get(key)
            if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
                version = str(cached[2])
            else:
                version = await _probe(real)
            if not version:
                continue
            fresh[key] = [st.st_size, st.st_mtime_ns, version]
            if version.startswith(f"3.{minor}."):
                runtimes[name] = RuntimeInfo(name=name, family="python", version=version, executable=real)
        _write_cache(cache_file, fresh)
        bootstrap_root = data_dir / "runtimes"
        _install_bootstraps(bootstrap_root)
        ordered = sorted(runtimes.values(), key=lambda r: int(r.name.split(".")[1]))
        return cls(ordered, bootstrap_root)

    def list(self) -> list[RuntimeInfo]:
        return list(self._runtimes.values())

    def get(self, name: str) -> RuntimeInfo:
        try:
            return self._runtimes[name]
        except KeyError:
            available = ", ".join(self._runtimes) or "none"
            raise RuntimeNotAvailableError(
                f"runtime {name!r} is not available on this server (available: {available})"
            ) from None

    def bootstrap_dir(self, runtime: RuntimeInfo) -> Path:
        return self._bootstrap_root / runtime.family

    async def ensure_compiled(self, runtime: RuntimeInfo) -> None:
        """Pre-compiles the bootstrap for `runtime`'s interpreter, so that no instance pays
        for compiling it (instances may not be able to write their runtime dir)."""
        if runtime.name in self._compiled:
            return
        async with self._compile_lock:
            if runtime.name in self._compiled:
                return
            await compile_tree(runtime, sorted(self.bootstrap_dir(runtime).glob("*.py")))
            self._compiled.add(runtime.name)


async def compile_tree(runtime: RuntimeInfo, paths: Sequence[Path]) -> None:
    """Byte-compiles `paths` (files or directories) with the runtime's own interpreter.
    Syntax errors are not raised here: they surface at init, as Lambda reports them."""
    code = (
        "import compileall,sys,os\n"
        "for p in sys.argv[1:]:\n"
        "    (compileall.compile_dir(p, quiet=2, workers=1) if os.path.isdir(p)"
        " else compileall.compile_file(p, quiet=2))\n"
    )
    result = await run_process([str(runtime.executable), "-I", "-S", "-c", code, *map(str, paths)])
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")
        log.warning("byte-compiling failed", extra={"runtime": runtime.name, "stderr": stderr})


async def _probe(executable: Path) -> str:
    try:
        result = await run_process([str(executable), "-I", "-S", "-c", _PROBE], timeout_s=10)
    except (OSError, TimeoutError):
        return ""
    parts = result.stdout.decode(errors="replace").split()
    if result.returncode != 0 or len(parts) != 2 or parts[0] != "cpython":
        return ""
    return parts[1]


def _read_cache(path: Path) -> dict[str, list[str | int]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, list[str | int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _install_bootstraps(root: Path) -> None:
    """Copies the shipped bootstraps into the data dir (the installed package may be read-only
    and instances must not see the platform's own files)."""
    source_dir = resources.files("hxb") / "bootstraps" / "python"
    target_dir = root / "python"
    target_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(target_dir, 0o755)  # noqa: S103 -- instances (another uid) read the runtime
    changed = False
    for source in source_dir.iterdir():
        if not source.name.endswith(".py"):
            continue
        target = target_dir / source.name
        content = source.read_bytes()
        if not target.exists() or target.read_bytes() != content:
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(content)
            os.chmod(tmp, 0o644)
            tmp.replace(target)
            changed = True
    if changed:
        shutil.rmtree(target_dir / "__pycache__", ignore_errors=True)
