"""The socks5 transport against a tiny SOCKS5 server: names reach the proxy unresolved."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import click
import gevent
import pytest
from conftest_tor import echo_roundtrip, onion_dns_guard  # noqa: F401 - fixture
from gevent.server import StreamServer

from anomos import hookimpl
from anomos.cli import build_cli
from anomos.config import Settings
from anomos.errors import ConfigError, TransportError
from anomos.plugins.transports.socks5 import SOCKS5Transport
from anomos.testing import free_port

ONION = "a" * 56 + ".onion"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class FakeSocks5:
    """Accepts CONNECT, records (address type, host, port), then echoes or refuses."""

    def __init__(self, reply: int = 0) -> None:
        self.reply = reply
        self.requests: list[tuple[int, str, int]] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _handle(self, sock: socket.socket, _peer: object) -> None:
        with sock:
            try:
                version, nmethods = _recv_exact(sock, 2)
                methods = _recv_exact(sock, nmethods)
                assert version == 5 and 0 in methods
                sock.sendall(b"\x05\x00")
                _ver, cmd, _rsv, atyp = _recv_exact(sock, 4)
                assert cmd == 1
                if atyp == 3:
                    host = _recv_exact(sock, _recv_exact(sock, 1)[0]).decode()
                elif atyp == 1:
                    host = socket.inet_ntoa(_recv_exact(sock, 4))
                else:
                    host = socket.inet_ntop(socket.AF_INET6, _recv_exact(sock, 16))
                (port,) = struct.unpack(">H", _recv_exact(sock, 2))
                self.requests.append((atyp, host, port))
                sock.sendall(bytes([5, self.reply, 0, 1]) + bytes(6))
                if self.reply:
                    return
                while data := sock.recv(65536):
                    sock.sendall(data)
            except EOFError:
                return

    def close(self) -> None:
        self.server.stop(timeout=1)


@pytest.fixture
def proxy() -> Iterator[FakeSocks5]:
    server = FakeSocks5()
    yield server
    server.close()


def transport_for(proxy_address: str) -> SOCKS5Transport:
    return SOCKS5Transport(Settings(options={"socks_proxy": proxy_address}))


def test_hostnames_reach_the_proxy_unresolved(proxy, onion_dns_guard):  # noqa: F811
    transport = transport_for(proxy.address)
    assert transport.can_dial(f"{ONION}:6881") and transport.can_dial("10.0.0.1:1")
    sock = transport.dial(f"{ONION}:6881", timeout=5)
    assert echo_roundtrip(sock, b"through the proxy") == b"through the proxy"
    sock = transport.dial("tracker.invalid:443", timeout=5)
    sock.close()
    assert proxy.requests[:2] == [(3, ONION, 6881), (3, "tracker.invalid", 443)]
    assert onion_dns_guard == []  # nothing asked the local resolver about the onion


def test_ip_literals_are_sent_as_addresses(proxy):
    sock = transport_for(proxy.address).dial("192.0.2.7:80", timeout=5)
    sock.close()
    gevent.sleep(0.05)
    assert proxy.requests == [(1, "192.0.2.7", 80)]


def test_proxy_down_is_a_transport_error():
    port = free_port()
    with pytest.raises(TransportError, match=rf"socks proxy is not reachable at 127.0.0.1:{port}"):
        transport_for(f"127.0.0.1:{port}").dial(f"{ONION}:1", timeout=2)


@pytest.mark.parametrize(
    ("reply", "words"),
    [(5, "0x05: Connection refused"), (0xF4, "0xf4: onion service needs client authorization")],
)
def test_proxy_refusal_names_the_reason(reply, words):
    server = FakeSocks5(reply=reply)
    try:
        with pytest.raises(TransportError, match=f"cannot reach {ONION}:1: {words}"):
            transport_for(server.address).dial(f"{ONION}:1", timeout=5)
    finally:
        server.close()


def test_silent_proxy_times_out():
    server = StreamServer(("127.0.0.1", 0), lambda sock, _peer: gevent.sleep(10))
    server.start()
    try:
        with pytest.raises(TransportError, match=r"did not reach .* within 0.3 s"):
            transport_for(f"127.0.0.1:{server.server_port}").dial("x.invalid:1", timeout=0.3)
    finally:
        server.stop(timeout=0)


def test_socks5_needs_a_proxy_and_listens_on_plain_tcp():
    with pytest.raises(ConfigError, match="--socks-proxy"):
        SOCKS5Transport(Settings())
    received = []
    transport = transport_for("127.0.0.1:1")
    listener = transport.listen("127.0.0.1:0", lambda sock, peer: received.append(sock.recv(5)))
    try:
        with socket.create_connection(("127.0.0.1", int(listener.address.rsplit(":", 1)[1]))) as s:
            s.sendall(b"hello")
            with gevent.Timeout(5):
                while not received:
                    gevent.sleep(0.01)
        assert received == [b"hello"]
    finally:
        listener.close()


class FakeCommandPlugin:
    """Adds a command with --transport, as the peer commands have."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    @hookimpl
    def anomos_add_commands(self, cli: click.Group) -> None:
        @click.command("fake")
        @click.option("--transport", default="tcp")
        def fake(transport: str) -> None:
            self.seen["transport"] = transport

        cli.add_command(fake)


def test_registered_and_adds_its_option(plugins):
    settings = Settings(options={"socks_proxy": "127.0.0.1:9050"})
    assert isinstance(plugins.transport("socks5", settings), SOCKS5Transport)
    fake = FakeCommandPlugin()
    plugins.pm.register(fake)
    cli = build_cli(plugins)
    argv = ["fake", "--transport", "socks5", "--socks-proxy", "127.0.0.1:9050"]
    cli.main(argv, obj=plugins, standalone_mode=False)
    assert fake.seen == {"transport": "socks5"}
    assert plugins.options["socks_proxy"] == "127.0.0.1:9050"
