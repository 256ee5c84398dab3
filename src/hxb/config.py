"""Platform settings: frozen dataclasses, one per component, and `load_settings`, the only
reader of the environment.

Every field `<section>.<key>` is set by the env var `HXB_<SECTION>_<KEY>` (top-level fields by
`HXB_<KEY>`) and by the matching `hxb serve` flag. Precedence: CLI > env > TOML file
(`HXB_CONFIG_FILE`) > defaults. Invalid values are errors that name the key, never ignored.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hxb.errors import ConfigError

T = TypeVar("T")

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Lambda's limits: 6 MB for a synchronous request or response, 50 MB for a zipped package.
    max_invoke_payload_bytes: int = 6 * MIB
    max_package_bytes: int = 50 * MIB
    graceful_shutdown_s: float = 5.0


def host_memory_budget_mb() -> int:
    """80% of this host's physical memory, in MB: the default node memory budget. The rest is
    left to the platform itself, the page cache and whatever else runs on the host."""
    try:
        total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # a platform without these sysconf names
        total_bytes = 4096 * MIB
    return max(1, total_bytes * 8 // 10 // MIB)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSettings:
    idle_timeout_s: float = 300.0
    shutdown_grace_s: float = 2.0
    init_timeout_s: float = 10.0
    max_instances: int = 256
    reap_interval_s: float = 1.0
    max_response_bytes: int = 6 * MIB
    # Sum of the `memory` of every instance of this node, stopping ones included. The default
    # depends on the host, so the settings table shows how it is computed, not a number.
    memory_budget_mb: int = field(
        default_factory=host_memory_budget_mb, metadata={"shown_default": "80% of physical memory"}
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    # Empty means the embedded default: SQLite in the data directory.
    url: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    flush_interval_s: float = 0.2
    # Beyond this many bytes waiting for the store, new log lines are dropped (and counted).
    max_pending_bytes: int = 64 * MIB
    max_line_bytes: int = 256 * 1024
    retention_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSettings:
    # "linux": namespaces, cgroups, seccomp (needs root); "local": a plain process per
    # instance, no isolation; "auto": linux when this host offers everything, else local.
    mode: str = "auto"
    uid: int = 990
    gid: int = 990
    pids_max: int = 1024
    # "nat": outbound through NAT from a namespace of its own; "none": loopback only.
    network: str = "nat"
    subnet: str = "10.213.0.0/16"
    prewarm_networks: int = 4
    prewarm_scratch: int = 2
    # Sandboxes prepared ahead of demand per runtime in use: a cold start then skips the
    # slow steps (moving into a cgroup, namespaces, most of the root file system).
    prewarm_sandboxes: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeSettings:
    # Extra directories searched for python3.X interpreters, colon-separated in the env var.
    python_search_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurrencySettings:
    # Seconds in which a workspace's burst credit (burst - default concurrency) refills from
    # empty to full.
    burst_refill_s: float = 60.0
    # The plan of the `default` workspace when `hxb serve` creates it.
    default_plan: str = "team"


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncSettings:
    """Asynchronous (event) invocations: the durable queue and its dispatcher."""

    # Lambda's limit for an event payload.
    max_payload_bytes: int = 256 * 1024
    # Delay before retry n (1, 2) of a failed event: retry_base_s * 2**(n-1).
    retry_base_s: float = 1.0
    # A throttled event (concurrency limit reached) waits this long before it is tried again;
    # that is not a retry: it never counts against the function's max_retries.
    throttle_delay_s: float = 0.5
    # Events of one function running at once; the rest wait in the store, not in tasks.
    max_in_flight_per_function: int = 64
    # On shutdown, how long running event invocations may finish; those still running are
    # cancelled and run again at the next start (at-least-once).
    shutdown_grace_s: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    data_dir: Path = Path(".hxb")
    region: str = "local"
    workspace: str = "default"
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    logs: LogSettings = field(default_factory=LogSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    runtimes: RuntimeSettings = field(default_factory=RuntimeSettings)
    # `async` is a keyword: the field has a trailing underscore, the env vars are HXB_ASYNC_*.
    async_: AsyncSettings = field(default_factory=AsyncSettings)
    concurrency: ConcurrencySettings = field(default_factory=ConcurrencySettings)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{(self.data_dir / 'hxb.db').resolve()}"


_SECTIONS: dict[str, type[Any]] = {
    "gateway": GatewaySettings,
    "pool": PoolSettings,
    "store": StoreSettings,
    "logs": LogSettings,
    "sandbox": SandboxSettings,
    "runtimes": RuntimeSettings,
    "async_": AsyncSettings,
    "concurrency": ConcurrencySettings,
}


def _section_key(name: str) -> str:
    """The section's name in env vars and TOML (`async_` -> `ASYNC`)."""
    return name.rstrip("_").upper()


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


def _caster(annotation: Any) -> Callable[[Any], Any]:
    if annotation is bool:
        return lambda v: v if isinstance(v, bool) else _parse_bool(str(v))
    if annotation is int:
        return lambda v: v if isinstance(v, int) and not isinstance(v, bool) else int(str(v))
    if annotation is float:
        return lambda v: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else float(str(v))
    if annotation is Path:
        return lambda v: Path(str(v))
    if annotation is str:
        return str
    if typing.get_origin(annotation) is tuple:
        return lambda v: tuple(v) if isinstance(v, list | tuple) else tuple(p for p in str(v).split(":") if p)
    raise TypeError(f"no caster for {annotation!r}")


def _build(cls: type[T], prefix: str, layers: list[Mapping[str, Any]]) -> T:
    """Builds dataclass `cls`, taking each field from the first layer that has it."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in _SECTIONS:
            continue
        key = f"{prefix}{f.name.upper()}"
        for layer in layers:
            if key in layer:
                raw = layer[key]
                try:
                    values[f.name] = _caster(hints[f.name])(raw)
                except (ValueError, TypeError):
                    kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
                    raise ConfigError(f"{key}={raw!r} is not a valid {kind}") from None
                break
    return cls(**values)


def _flatten_toml(doc: Mapping[str, Any], prefix: str = "HXB_") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and any(key.upper() == _section_key(name) for name in _SECTIONS):
            flat.update(_flatten_toml(value, f"{prefix}{key.upper()}_"))
        else:
            flat[f"{prefix}{key.upper()}"] = value
    return flat


def load_settings(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Reads settings from `environ` (and the TOML file it names), then applies `overrides`,
    keyed by env var name (`HXB_GATEWAY_PORT`), which is how CLI flags arrive."""
    layers: list[Mapping[str, Any]] = [dict(overrides or {}), environ]
    config_file = environ.get("HXB_CONFIG_FILE")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                layers.append(_flatten_toml(tomllib.load(fh)))
        except OSError as exc:
            raise ConfigError(f"HXB_CONFIG_FILE={config_file!r}: cannot read it ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"HXB_CONFIG_FILE={config_file!r}: invalid TOML: {exc}") from None
    _check_known_keys(layers)
    sections = {name: _build(cls, f"HXB_{_section_key(name)}_", layers) for name, cls in _SECTIONS.items()}
    top = _build(Settings, "HXB_", layers)
    settings = dataclasses.replace(top, **sections)
    _validate(settings)
    return settings


def _known_keys() -> set[str]:
    keys = {f"HXB_{f.name.upper()}" for f in dataclasses.fields(Settings) if f.name not in _SECTIONS}
    for name, cls in _SECTIONS.items():
        keys |= {f"HXB_{_section_key(name)}_{f.name.upper()}" for f in dataclasses.fields(cls)}
    return keys


# Env vars with the HXB_ prefix that are not settings: the CLI's and the instances' own.
_NOT_SETTINGS = frozenset({"HXB_CONFIG_FILE", "HXB_ENDPOINT"})


def _check_known_keys(layers: list[Mapping[str, Any]]) -> None:
    known = _known_keys() | _NOT_SETTINGS
    overrides = layers[0]
    for key in overrides:
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
    for layer in layers[2:]:  # TOML: a typo there is an error; stray env vars are not
        for key in layer:
            if key not in known:
                raise ConfigError(f"HXB_CONFIG_FILE: unknown setting {key!r}")


def _validate(settings: Settings) -> None:
    checks: list[tuple[bool, str]] = [
        (0 <= settings.gateway.port <= 65535, f"HXB_GATEWAY_PORT={settings.gateway.port} is not a TCP port"),
        (settings.pool.idle_timeout_s > 0, "HXB_POOL_IDLE_TIMEOUT_S must be > 0"),
        (settings.pool.shutdown_grace_s >= 0, "HXB_POOL_SHUTDOWN_GRACE_S must be >= 0"),
        (settings.pool.init_timeout_s > 0, "HXB_POOL_INIT_TIMEOUT_S must be > 0"),
        (settings.pool.max_instances >= 1, "HXB_POOL_MAX_INSTANCES must be >= 1"),
        (settings.pool.memory_budget_mb >= 1, "HXB_POOL_MEMORY_BUDGET_MB must be >= 1"),
        (settings.logs.flush_interval_s > 0, "HXB_LOGS_FLUSH_INTERVAL_S must be > 0"),
        (
            settings.sandbox.mode in {"auto", "linux", "local"},
            f"HXB_SANDBOX_MODE={settings.sandbox.mode!r}: expected auto, linux or local",
        ),
        (
            settings.sandbox.network in {"nat", "none"},
            f"HXB_SANDBOX_NETWORK={settings.sandbox.network!r}: expected nat or none",
        ),
        (settings.sandbox.uid > 0 and settings.sandbox.gid > 0, "HXB_SANDBOX_UID/GID must not be 0 (root)"),
        (bool(settings.region.strip()), "HXB_REGION must not be empty"),
        (settings.async_.max_payload_bytes >= 1, "HXB_ASYNC_MAX_PAYLOAD_BYTES must be >= 1"),
        (settings.async_.retry_base_s >= 0, "HXB_ASYNC_RETRY_BASE_S must be >= 0"),
        (settings.async_.throttle_delay_s > 0, "HXB_ASYNC_THROTTLE_DELAY_S must be > 0"),
        (settings.async_.max_in_flight_per_function >= 1, "HXB_ASYNC_MAX_IN_FLIGHT_PER_FUNCTION must be >= 1"),
        (settings.async_.shutdown_grace_s >= 0, "HXB_ASYNC_SHUTDOWN_GRACE_S must be >= 0"),
        (settings.concurrency.burst_refill_s > 0, "HXB_CONCURRENCY_BURST_REFILL_S must be > 0"),
        (
            settings.concurrency.default_plan in {"single", "single_user", "team", "enterprise"},
            f"HXB_CONCURRENCY_DEFAULT_PLAN={settings.concurrency.default_plan!r}: expected single, team or enterprise",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def settings_table() -> list[tuple[str, str, str]]:
    """(env var, default, section) for every setting: docs/configuration.md is checked against it."""
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(Settings):
        if f.name in _SECTIONS:
            rows.extend(
                (f"HXB_{_section_key(f.name)}_{sf.name.upper()}", repr(_default(sf)), f.name)
                for sf in dataclasses.fields(_SECTIONS[f.name])
            )
        else:
            rows.append((f"HXB_{f.name.upper()}", repr(_default(f)), ""))
    return rows


def _default(f: dataclasses.Field[Any]) -> Any:
    if "shown_default" in f.metadata:
        return f.metadata["shown_default"]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


__all__ = [
    "AsyncSettings",
    "ConcurrencySettings",
    "GatewaySettings",
    "LogSettings",
    "PoolSettings",
    "RuntimeSettings",
    "SandboxSettings",
    "Settings",
    "StoreSettings",
    "load_settings",
    "settings_table",
]
