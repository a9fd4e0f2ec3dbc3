"""Onion services and the tor transport on a private, offline Tor network (one per module)."""

from __future__ import annotations

import stat
import time

import pytest
from conftest_tor import (  # noqa: F401 - fixtures
    echo_roundtrip,
    echo_server,
    needs_tor,
    onion_dns_guard,
    timings,
    tor_network,
)

from anomos.config import Settings
from anomos.errors import TransportError
from anomos.plugins.transports.tor import TorTransport
from anomos.testing import free_port
from anomos.tor import onion
from anomos.tor.control import connect_control

pytestmark = [*needs_tor, pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")]

DIAL_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def client(tor_network):  # noqa: F811
    """A tor transport attached to the network's client tor."""
    transport = TorTransport(Settings(options={"tor_control": tor_network.client_control_address}))
    yield transport
    transport.close()


@pytest.fixture
def service(tor_network):  # noqa: F811
    controller = connect_control(tor_network.service_control_address)
    yield controller
    controller.close()


def test_onion_service_echo_through_the_tor_transport(
    tor_network,  # noqa: F811
    client,
    service,
    echo_server,  # noqa: F811
    onion_dns_guard,  # noqa: F811
    tmp_path,
):
    began = time.monotonic()
    name = onion.publish(service, echo_server.port, key_path=tmp_path / "key")
    timings["onion_published"] = time.monotonic() - began
    print(f"\nonion service published in {timings['onion_published']:.1f} s")
    assert name.endswith(".onion") and len(name) == 62
    assert client.socks == (tor_network.socks_host, tor_network.socks_port)
    assert client.can_dial(f"{name}:{echo_server.port}")
    began = time.monotonic()
    sock = client.dial(f"{name}:{echo_server.port}", timeout=DIAL_TIMEOUT)
    print(f"first connection to the onion in {time.monotonic() - began:.1f} s")
    payload = bytes(range(256)) * 64
    assert echo_roundtrip(sock, payload) == payload
    # Tor may retry a stream's BEGIN on a fresh rendezvous circuit, so the service can see
    # an extra connection; what matters is that the bytes came back through the onion.
    assert echo_server.connections >= 1
    assert onion_dns_guard == []  # the .onion never reached the local resolver


def test_saved_key_gives_the_same_address_after_restart(tor_network, tmp_path):  # noqa: F811
    key_path = tmp_path / "state" / "onion_key"
    first = connect_control(tor_network.service_control_address)
    try:
        address = onion.publish(first, 6881, key_path=key_path)
    finally:
        first.close()  # the ephemeral service dies with its control connection
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_text()
    second = connect_control(tor_network.service_control_address)
    try:
        assert onion.publish(second, 6881, key_path=key_path) == address
        assert onion.publish(second, 6882) != address  # no key path: a fresh address
    finally:
        second.close()
    assert key_path.read_text() == key


def test_tor_listener_is_an_onion_service(tor_network, client, tmp_path):  # noqa: F811
    # listens through the onion-service tor; that tor has no SocksPort, so name the client's
    settings = Settings(
        listen="127.0.0.1:0",
        state_dir=tmp_path,
        options={
            "tor_control": tor_network.service_control_address,
            "tor_socks": tor_network.socks_address,
        },
    )
    server_side = TorTransport(settings)
    seen = []

    def handler(sock, peer):
        seen.append(peer)
        with sock:
            sock.sendall(sock.recv(100).upper())

    listener = server_side.listen("127.0.0.1:0", handler)
    try:
        host, port = listener.address.rsplit(":", 1)
        assert host.endswith(".onion") and int(port) > 0
        assert (tmp_path / "onion_key").exists()
        sock = client.dial(listener.address, timeout=DIAL_TIMEOUT)
        assert echo_roundtrip(sock, b"hello onion") == b"HELLO ONION"
        assert seen and seen[0].startswith("127.0.0.1:")  # tor connects from loopback
    finally:
        listener.close()
        server_side.close()


def test_client_authorization(tor_network, client, service, echo_server):  # noqa: F811
    allowed = onion.ClientAuthKey.generate()
    name = onion.publish(service, echo_server.port, client_auth_keys=[allowed.public_b32])
    address = f"{name}:{echo_server.port}"
    with pytest.raises(TransportError, match="client authorization"):
        client.dial(address, timeout=DIAL_TIMEOUT)
    onion.add_client_auth(client.controller, name, allowed)
    sock = client.dial(address, timeout=DIAL_TIMEOUT)
    assert echo_roundtrip(sock, b"authorized") == b"authorized"


def test_dead_socks_port_never_falls_back_to_direct(tor_network, echo_server):  # noqa: F811
    port = free_port()
    transport = TorTransport(
        Settings(
            options={
                "tor_control": tor_network.client_control_address,
                "tor_socks": f"127.0.0.1:{port}",
            }
        )
    )
    try:
        with pytest.raises(TransportError, match=f"^tor is not reachable at 127.0.0.1:{port}: "):
            transport.dial(f"127.0.0.1:{echo_server.port}", timeout=5)
        assert echo_server.connections == 0  # no direct connection was made
    finally:
        transport.close()
    with pytest.raises(TransportError, match="control connection closed"):
        transport.listen("127.0.0.1:0", lambda sock, peer: None)


def test_launched_tor_joins_and_dials(tor_network, service, echo_server, tmp_path):  # noqa: F811
    name = onion.publish(service, echo_server.port)
    settings = Settings(
        state_dir=tmp_path,
        options={"tor_launch": True, "tor_launch_config": tor_network.join_config()},
    )
    transport = TorTransport(settings)
    try:
        assert transport._launched is not None
        process = transport._launched.process
        sock = transport.dial(f"{name}:{echo_server.port}", timeout=DIAL_TIMEOUT)
        assert echo_roundtrip(sock, b"from a launched tor") == b"from a launched tor"
    finally:
        transport.close()
    assert process.poll() is not None  # our tor is gone with the transport
