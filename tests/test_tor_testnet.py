"""TorTestNetwork's refusals: missing tools, too small a network, no bootstrap in time."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psutil
import pytest
from conftest_tor import skip_without_tor

from anomos.errors import ConfigError, TransportError
from anomos.tor.testnet import TorNode, TorTestNetwork


def test_missing_tor_is_one_line(tmp_path):
    network = TorTestNetwork(tmp_path, tor_cmd="no-such-tor")
    with pytest.raises(
        TransportError, match=r"^no-such-tor is not installed \(on Debian: apt-get install tor\)$"
    ):
        network.start()


def test_too_small_a_network_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="at least 1 authority and 3 routers"):
        TorTestNetwork(tmp_path, authorities=1, relays=1)


@pytest.mark.tor
@pytest.mark.slow
@skip_without_tor
def test_no_bootstrap_in_time_names_the_tor_and_logs_its_tail(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="anomos.tor.testnet")
    monkeypatch.setattr(TorTestNetwork, "_launch", _launch_and_wait_for_a_notice)
    network = TorTestNetwork(tmp_path)
    with pytest.raises(TransportError) as info:
        network.start(timeout=0.5)  # the authorities cannot vote that fast
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("private Tor network did not start: auth0 ")
    assert "when time ran out" in message and str(tmp_path / "auth0" / "notice.log") in message
    assert "its log ends:" in caplog.text
    assert "[notice]" in caplog.text.split("its log ends:", 1)[1]  # the tail, in the debug log
    assert network.nodes == [] and network.socks_port == 0
    assert not [p for p in psutil.Process().children() if p.name() == "tor"]


_launch = TorTestNetwork._launch
#: Seconds a freshly launched tor gets to write its first notice.
FIRST_NOTICE_TIMEOUT = 30.0


def _launch_and_wait_for_a_notice(self: TorTestNetwork, node: TorNode) -> None:
    """Launch as usual, then wait until the tor has logged something: the 0.5 s deadline
    runs out right after the launch, before a busy machine's tor may have written a line,
    and an empty tail would prove nothing."""
    _launch(self, node)
    files = (node.log_path, node.data_dir / "stdout.log")
    deadline = time.monotonic() + FIRST_NOTICE_TIMEOUT
    while not any("[notice]" in _text(path) for path in files):
        assert time.monotonic() < deadline, f"tor {node.name} logged no notice in time"
        time.sleep(0.05)


def _text(path: Path) -> str:
    try:
        return path.read_text("utf-8", "replace")
    except OSError:
        return ""
