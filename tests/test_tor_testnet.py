"""TorTestNetwork's refusals: missing tools, too small a network, no bootstrap in time."""

from __future__ import annotations

import logging

import psutil
import pytest
from conftest_tor import skip_without_tor

from anomos.errors import ConfigError, TransportError
from anomos.tor.testnet import TorTestNetwork


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
def test_no_bootstrap_in_time_names_the_tor_and_logs_its_tail(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="anomos.tor.testnet")
    network = TorTestNetwork(tmp_path)
    with pytest.raises(TransportError) as info:
        network.start(timeout=0.5)  # the authorities cannot vote that fast
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("private Tor network did not start: auth0 ")
    assert "when time ran out" in message and str(tmp_path / "auth0" / "notice.log") in message
    assert (
        "its log ends:" in caplog.text and "[notice]" in caplog.text
    )  # the tail, in the debug log
    assert network.nodes == [] and network.socks_port == 0
    assert not [p for p in psutil.Process().children() if p.name() == "tor"]
