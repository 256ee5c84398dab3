"""`load_settings`: defaults, the environment, the TOML file and CLI overrides, and errors that
name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hxb.config import (
    GatewaySettings,
    LogSettings,
    PoolSettings,
    Settings,
    load_settings,
    settings_table,
)
from hxb.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "hxb.toml"
    path.write_text(text)
    return {"HXB_CONFIG_FILE": str(path)}


def test_defaults_without_any_source() -> None:
    settings = load_settings({})

    assert settings == Settings()
    assert settings.gateway == GatewaySettings(host="127.0.0.1", port=8080)
    assert settings.pool.max_instances == 256
    assert settings.store_url.startswith("sqlite:///")
    assert settings.store_url.endswith("/.hxb/hxb.db")


def test_env_sets_every_kind_of_field() -> None:
    settings = load_settings(
        {
            "HXB_DATA_DIR": "/srv/hxb",
            "HXB_REGION": "eu-1",
            "HXB_GATEWAY_PORT": "9000",
            "HXB_POOL_IDLE_TIMEOUT_S": "1.5",
            "HXB_POOL_MAX_INSTANCES": "8",
            "HXB_STORE_URL": "postgresql://db/hxb",
            "HXB_RUNTIMES_PYTHON_SEARCH_PATHS": "/opt/py/bin::/usr/local/py/bin",
        }
    )

    assert settings.data_dir == Path("/srv/hxb")
    assert settings.region == "eu-1"
    assert settings.gateway.port == 9000
    assert settings.pool.idle_timeout_s == 1.5
    assert settings.pool.max_instances == 8
    assert settings.store_url == "postgresql://db/hxb"
    assert settings.runtimes.python_search_paths == ("/opt/py/bin", "/usr/local/py/bin")


def test_cli_overrides_win_over_env() -> None:
    settings = load_settings(
        {"HXB_GATEWAY_PORT": "9000", "HXB_REGION": "env"},
        {"HXB_GATEWAY_PORT": 9100, "HXB_DATA_DIR": Path("/cli")},
    )

    assert settings.gateway.port == 9100
    assert settings.data_dir == Path("/cli")
    assert settings.region == "env"


def test_toml_file_is_read_and_env_wins_over_it(tmp_path: Path) -> None:
    environ = _toml(
        tmp_path,
        """
        region = "toml"
        workspace = "team"
        [gateway]
        port = 7000
        host = "0.0.0.0"
        [pool]
        idle_timeout_s = 30
        [runtimes]
        python_search_paths = ["/a", "/b"]
        """,
    )
    environ["HXB_GATEWAY_PORT"] = "7100"

    settings = load_settings(environ)

    assert settings.region == "toml"
    assert settings.workspace == "team"
    assert settings.gateway.port == 7100
    assert settings.gateway.host == "0.0.0.0"  # noqa: S104
    assert settings.pool.idle_timeout_s == 30.0
    assert isinstance(settings.pool.idle_timeout_s, float)
    assert settings.runtimes.python_search_paths == ("/a", "/b")


def test_cli_overrides_win_over_toml(tmp_path: Path) -> None:
    environ = _toml(tmp_path, "[gateway]\nport = 7000\n")

    assert load_settings(environ, {"HXB_GATEWAY_PORT": 7200}).gateway.port == 7200


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HXB_GATEWAY_PORT": "eighty"}, "HXB_GATEWAY_PORT='eighty' is not a valid int"),
        ({"HXB_POOL_MAX_INSTANCES": "1.5"}, "HXB_POOL_MAX_INSTANCES='1.5' is not a valid int"),
        ({"HXB_POOL_IDLE_TIMEOUT_S": "soon"}, "HXB_POOL_IDLE_TIMEOUT_S='soon' is not a valid float"),
        ({"HXB_GATEWAY_PORT": "70000"}, "HXB_GATEWAY_PORT=70000 is not a TCP port"),
        ({"HXB_POOL_IDLE_TIMEOUT_S": "0"}, "HXB_POOL_IDLE_TIMEOUT_S must be > 0"),
        ({"HXB_POOL_MAX_INSTANCES": "0"}, "HXB_POOL_MAX_INSTANCES must be >= 1"),
        ({"HXB_SANDBOX_MODE": "firecracker"}, "HXB_SANDBOX_MODE='firecracker'"),
        ({"HXB_REGION": "  "}, "HXB_REGION must not be empty"),
    ],
)
def test_bad_env_value_names_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)

    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[gateway]\nport = "eighty"\n', "HXB_GATEWAY_PORT"),
        ("[gateway]\nport = true\n", "HXB_GATEWAY_PORT"),
        ("[pool]\nmax_instances = 2.5\n", "HXB_POOL_MAX_INSTANCES"),
        ("[pool]\nidle_timeout_s = false\n", "HXB_POOL_IDLE_TIMEOUT_S"),
    ],
)
def test_bad_toml_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(_toml(tmp_path, text))


def test_bad_override_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="HXB_GATEWAY_PORT"):
        load_settings({}, {"HXB_GATEWAY_PORT": "eighty"})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'HXB_GATEWAY_PROT'"):
        load_settings({}, {"HXB_GATEWAY_PROT": 1})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[pool]\nmax_instancez = 3\n", "HXB_POOL_MAX_INSTANCEZ"),
        ("colour = 'blue'\n", "HXB_COLOUR"),
        ("[cache]\nsize = 3\n", "HXB_CACHE"),
        ("pool = 3\n", "HXB_POOL"),
    ],
)
def test_unknown_toml_key_is_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"HXB_CONFIG_FILE: unknown setting '{key}'"):
        load_settings(_toml(tmp_path, text))


def test_stray_hxb_env_vars_are_ignored() -> None:
    settings = load_settings({"HXB_ENDPOINT": "http://x", "HXB_SOMETHING_ELSE": "1", "HXB_GATEWAY_PORT": "9001"})

    assert settings.gateway.port == 9001


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"HXB_CONFIG_FILE=.*cannot read it"):
        load_settings({"HXB_CONFIG_FILE": str(tmp_path / "absent.toml")})


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(_toml(tmp_path, "[gateway\nport = 1\n"))


def test_settings_table_lists_every_env_var_with_its_default() -> None:
    rows = {env: (default, section) for env, default, section in settings_table()}

    assert rows["HXB_GATEWAY_PORT"] == ("8080", "gateway")
    assert rows["HXB_POOL_SHUTDOWN_GRACE_S"] == (repr(PoolSettings().shutdown_grace_s), "pool")
    assert rows["HXB_LOGS_MAX_LINE_BYTES"] == (repr(LogSettings().max_line_bytes), "logs")
    assert rows["HXB_REGION"] == ("'local'", "")
    assert "HXB_GATEWAY" not in rows
