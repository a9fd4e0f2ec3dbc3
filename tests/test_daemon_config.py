"""The daemon's TOML config: defaults under XDG, and one line for each bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomos.daemon.config import (
    DEFAULT_RPC_PORT,
    default_config_file,
    default_state_dir,
    load_config,
)
from anomos.errors import ConfigError


def test_defaults_follow_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "c"))
    assert default_state_dir() == tmp_path / "s" / "anomos" / "daemon"
    assert default_config_file() == tmp_path / "c" / "anomos" / "daemon.toml"
    config = load_config(tmp_path / "absent.toml")
    assert config.rpc_bind_address == "127.0.0.1" and config.rpc_port == DEFAULT_RPC_PORT
    assert not config.auth_required
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", required=True)


def test_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(
        'rpc-bind-address = "0.0.0.0"\nrpc-port = 9999\nrpc-username = "a"\n'
        'rpc-password = "b"\ndownload-dir = "~/dl"\nlisten = "127.0.0.5:0"\n'
    )
    config = load_config(path)
    assert (config.rpc_bind_address, config.rpc_port) == ("0.0.0.0", 9999)
    assert config.auth_required and config.download_dir == Path("~/dl").expanduser()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rpc-prot = 1\n", "unknown key 'rpc-prot'"),
        ('rpc-port = "9091"\n', "rpc-port must be an integer"),
        ("rpc-port = 70000\n", "outside 0-65535"),
        ('rpc-bind-address = "0.0.0.0"\n', "not loopback: set rpc-username and rpc-password"),
        ('rpc-bind-address = "::"\nrpc-username = "a"\n', "not loopback"),
        ('tracker = "https://t.example/announce"\n', "set both or neither"),
        ('listen = "nowhere"\n', "is not HOST:PORT"),
        ("rpc-port = [\n", "daemon.toml"),
    ],
)
def test_a_bad_setting_is_one_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")) as info:
        load_config(path)
    assert "\n" not in str(info.value)
