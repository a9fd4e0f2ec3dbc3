"""TrackerSettings: one frozen value with working defaults, bad values refused by name."""

from __future__ import annotations

import attrs
import pytest

from anomos.errors import ConfigError
from anomos.tracker import settings as settings_mod
from anomos.tracker.settings import TrackerSettings


def test_defaults_are_the_documented_constants_and_the_value_is_frozen():
    s = TrackerSettings()
    assert (s.interval, s.min_interval) == (
        settings_mod.ANNOUNCE_INTERVAL,
        settings_mod.MIN_INTERVAL,
    )
    assert (s.rate, s.burst) == (settings_mod.RATE_PER_SECOND, settings_mod.RATE_BURST)
    assert s.keepalive_idle < s.request_timeout
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.rate = 1.0  # type: ignore[misc]
    assert attrs.evolve(s, shared_clients=["127.0.0.1"]).shared_clients == frozenset({"127.0.0.1"})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("min_ratio", 50.0, "--min-ratio 50"),
        ("min_ratio", -1.0, "--min-ratio -1"),
        ("ratio_grace", -1, "--ratio-grace must not be negative"),
        ("rate", 0.0, "rate must be above 0"),
        ("keepalive_idle", 0.0, "keepalive_idle must be above 0"),
        ("max_connections_per_ip", 0, "max_connections_per_ip must be above 0"),
    ],
)
def test_bad_values_are_refused_with_their_name(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrackerSettings(**{field: value})
