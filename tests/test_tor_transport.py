"""The tor transport and onion helpers without a Tor network: refusals, keys, options."""

from __future__ import annotations

import base64
import os
import stat

import click
import gevent
import pytest
from gevent.server import StreamServer

from anomos import hookimpl
from anomos.cli import build_cli
from anomos.config import Settings
from anomos.errors import ConfigError, TransportError
from anomos.plugins.transports.tor import TorTransport
from anomos.testing import free_port
from anomos.tor import onion
from anomos.tor.control import connect_control, launch_tor

pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")  # stem's threads


def test_tor_down_refuses_at_construction(plugins):
    port = free_port()
    settings = Settings(options={"tor_control": f"127.0.0.1:{port}"})
    with pytest.raises(
        TransportError, match=rf"^tor is not reachable at 127\.0\.0\.1:{port}: .*refused"
    ):
        plugins.transport("tor", settings)


def test_tor_default_control_port_is_named(monkeypatch):
    monkeypatch.setattr("anomos.plugins.transports.tor.DEFAULT_CONTROL", f"127.0.0.1:{free_port()}")
    with pytest.raises(TransportError, match=r"tor is not reachable at 127\.0\.0\.1:"):
        TorTransport(Settings())


def test_silent_control_port_times_out():
    server = StreamServer(("127.0.0.1", 0), lambda sock, _peer: gevent.sleep(5))
    server.start()
    address = f"127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(
            TransportError, match=f"tor is not reachable at {address}: no answer within 0.5 s"
        ):
            connect_control(address, timeout=0.5)
    finally:
        server.stop(timeout=0)


def test_missing_tor_binary_cannot_be_launched(tmp_path):
    with pytest.raises(TransportError, match=r"cannot launch tor: .*doesn't exist"):
        launch_tor(tmp_path / "tor", tor_cmd=str(tmp_path / "no-such-tor"))


# --------------------------------------------------------------------------- onion keys
def test_service_key_file_is_private_and_validated(tmp_path):
    key_path = tmp_path / "keys" / "onion_key"
    blob = "ED25519-V3:" + base64.b64encode(os.urandom(64)).decode()
    onion.save_key(key_path, blob)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert onion.load_key(key_path) == blob
    assert onion.load_key(tmp_path / "absent") is None
    os.chmod(key_path, 0o644)
    assert onion.load_key(key_path) == blob
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600  # tightened, never loosened
    for bad in ("RSA1024:abc", "ED25519-V3:" + "A" * 40, "x" * 5000):
        key_path.write_text(bad)
        with pytest.raises(ConfigError, match="is not an onion service key"):
            onion.load_key(key_path)


def test_client_auth_key_formats():
    key = onion.ClientAuthKey.generate()
    assert len(key.public_b32) == 52 and len(key.private_b32) == 52
    assert base64.b64decode(key.private_b64) == key.private
    assert onion.ClientAuthKey.from_private(key.private).public == key.public
    assert onion.parse_client_auth_public(key.public_b32.lower()) == key.public_b32
    assert onion.parse_client_auth_public("descriptor:x25519:" + key.public_b32) == key.public_b32
    with pytest.raises(ConfigError, match="not a base32 x25519 client authorization key"):
        onion.parse_client_auth_public("not-a-key")
    assert "private" not in repr(key).replace("private_b", "")  # the secret stays out of logs


def test_service_id_validation():
    sid = "b" * 56
    assert onion.service_id_of(f"{sid}.onion") == sid
    assert onion.service_id_of(f"{sid.upper()}.ONION:6881") == sid
    with pytest.raises(ConfigError, match="not a v3 onion address"):
        onion.service_id_of("short.onion")


# --------------------------------------------------------------------------- options
class FakeCommandPlugin:
    """A command with --transport, as the peer commands have."""

    @hookimpl
    def anomos_add_commands(self, cli: click.Group) -> None:
        @click.command("fake")
        @click.option("--transport", default="tcp")
        def fake(transport: str) -> None:
            pass

        cli.add_command(fake)


def test_tor_options_reach_plugins_options(plugins):
    plugins.pm.register(FakeCommandPlugin())
    cli = build_cli(plugins)
    key = onion.ClientAuthKey.generate().public_b32
    argv = ["fake", "--transport", "tor", "--tor-control", "127.0.0.1:9151"]
    argv += ["--onion-client-auth", key, "--tor-launch"]
    cli.main(argv, obj=plugins, standalone_mode=False)
    assert plugins.options["tor_control"] == "127.0.0.1:9151"
    assert plugins.options["onion_client_auth"] == (key,)
    assert plugins.options["tor_launch"] is True
