from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from shared import ConfigError, load_config


class Server(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)


class Settings(BaseModel):
    server: Server = Server()
    name: str = "edge"


def test_defaults_apply_without_file_or_environment() -> None:
    assert load_config(Settings, env={}) == Settings()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "edgeloop.toml"
    path.write_text('name = "kiosk"\n[server]\nport = 9000\nhost = "0.0.0.0"\n')
    cfg = load_config(Settings, path, env={"EDGELOOP_SERVER__PORT": "9100", "OTHER": "x"})
    assert (cfg.name, cfg.server.host, cfg.server.port) == ("kiosk", "0.0.0.0", 9100)


def test_a_bad_value_from_the_environment_names_the_key_and_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Settings, env={"EDGELOOP_SERVER__PORT": "seventy"})
    assert info.value.key == "server.port"
    assert info.value.source == "EDGELOOP_SERVER__PORT"
    assert "server.port" in str(info.value) and "seventy" in str(info.value)


def test_command_line_options_override_the_environment_and_are_named_when_bad() -> None:
    env = {"EDGELOOP_SERVER__PORT": "9100", "EDGELOOP_NAME": "kiosk"}
    cfg = load_config(Settings, env=env, overrides=[("server.port", 9200, "--port")])
    assert (cfg.name, cfg.server.port) == ("kiosk", 9200)
    with pytest.raises(ConfigError) as info:
        load_config(Settings, env=env, overrides=[("server.port", 99999, "--port")])
    assert info.value.key == "server.port" and info.value.source == "--port"


def test_a_bad_value_from_the_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "edgeloop.toml"
    path.write_text("[server]\nport = 70000\n")
    with pytest.raises(ConfigError) as info:
        load_config(Settings, path, env={})
    assert info.value.key == "server.port" and info.value.source == str(path)


def test_an_unknown_key_is_an_error_when_the_model_forbids_extras(tmp_path: Path) -> None:
    class Strict(BaseModel, extra="forbid"):
        port: int = 1

    path = tmp_path / "c.toml"
    path.write_text("prot = 2\n")
    with pytest.raises(ConfigError, match="'prot'"):
        load_config(Strict, path, env={})


def test_a_file_that_is_not_toml_or_missing_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Settings, bad, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Settings, tmp_path / "absent.toml", env={})


class Secrets(BaseModel):
    api_key: int = 0
    database_url: int = 0


def test_a_rejected_secret_or_url_password_is_not_repeated_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Secrets, env={"EDGELOOP_API_KEY": "sk-live-hunter2"})
    assert info.value.key == "api_key" and "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(Secrets, env={"EDGELOOP_DATABASE_URL": "postgresql://bob:hunter2@db/x"})
    message = str(info.value)
    assert "hunter2" not in message and "postgresql://bob:***@db/x" in message
