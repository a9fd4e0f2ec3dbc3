"""The daemon's limits in memory: the seed-limit rule, limit values, the live throttle,
and the limit keys of daemon.toml (the daemon itself: tests/test_daemon_control.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from anomos.daemon.config import load_config
from anomos.daemon.limits import LimitError, LimitMode, TorrentLimits, seed_limit_reached
from anomos.errors import ConfigError
from anomos.net.ratelimit import Throttle
from anomos.torrent.session import TorrentSession


def reached(
    limits: TorrentLimits, ratio: float = 0.0, idle: float = 0.0, **session: object
) -> str | None:
    args = {"session_ratio": None, "session_idle_minutes": None, **session}
    return seed_limit_reached(limits, ratio=ratio, idle_seconds=idle, **args)  # type: ignore[arg-type]


def test_seed_limits_follow_transmissions_modes() -> None:
    limits = TorrentLimits()  # mode 0: the session's limits
    assert reached(limits, ratio=5.0, idle=10_000) is None  # the session has none
    assert "ratio limit 2" in (reached(limits, ratio=2.0, session_ratio=2.0) or "")
    assert reached(limits, ratio=1.99, session_ratio=2.0) is None
    assert "idle" in (reached(limits, idle=600, session_idle_minutes=10) or "")
    assert reached(limits, idle=599, session_idle_minutes=10) is None
    limits.update(
        {"seedRatioMode": 1, "seedRatioLimit": 0.5, "seedIdleMode": 1, "seedIdleLimit": 1}
    )
    assert "ratio limit 0.5" in (reached(limits, ratio=0.5, session_ratio=9.0) or "")
    assert "idle for 1 min" in (reached(limits, idle=60) or "")
    limits.update({"seedRatioMode": 2, "seedIdleMode": 2})  # unlimited: never
    assert reached(limits, ratio=99, idle=10**6, session_ratio=0.0, session_idle_minutes=0) is None


def test_a_bad_limit_value_changes_nothing() -> None:
    limits = TorrentLimits()
    for bad in (
        {"downloadLimit": 50, "seedRatioMode": 3},
        {"downloadLimit": True},
        {"uploadLimit": -1},
        {"seedRatioLimit": float("nan")},
        {"downloadLimited": 1},
        {"seedIdleLimit": 1.5},
    ):
        with pytest.raises(LimitError):
            limits.update(bad)
    assert limits == TorrentLimits() and limits.down.rate is None
    limits.update({"downloadLimit": 50, "downloadLimited": True, "seedRatioMode": 1})
    assert limits.down.rate == 50_000 and limits.seed_ratio_mode is LimitMode.SINGLE
    assert TorrentLimits(**{"seed_ratio_mode": 2}).seed_ratio_mode is LimitMode.UNLIMITED
    limits.update({"downloadLimited": False})
    assert limits.down.rate is None


def test_a_throttle_can_be_set_changed_and_lifted() -> None:
    throttle = Throttle()
    throttle.take(10**9)  # no rate: returns at once
    assert throttle.step(256 * 1024) == 256 * 1024
    throttle.set_rate(40_000)
    # Under a limit, reads are one burst (a quarter second) at a time, so the pace is even.
    assert throttle.step(256 * 1024) == 10_000 and throttle.step(4096) == 4096
    throttle.set_rate(1000)
    bucket = throttle._bucket
    throttle.set_rate(1000)
    assert throttle._bucket is bucket  # the same rate keeps its tokens
    throttle.set_rate(2000)
    assert throttle.rate == 2000
    throttle.set_rate(None)
    assert throttle.rate is None


def test_limit_keys_in_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(
        "speed-limit-down = 500\nspeed-limit-down-enabled = true\nratio-limit = 1\n"
        'ratio-limit-enabled = true\ndownload-queue-size = 2\nmax-send-rate = "2M"\n'
    )
    config = load_config(path)
    assert config.speed_limit_down == 500 and config.speed_limit_down_enabled
    assert config.ratio_limit == 1.0 and config.ratio_limit_enabled
    assert config.download_queue_size == 2 and config.max_send_rate == 2_000_000
    for line, message in (
        ("speed-limit-up-enabled = 1", "true or false"),
        ("seed-queue-size = -3", "outside"),
        ('speed-limit-up = "fast"', "an integer"),
        ("seedRatioLimit = 2.0", "unknown key"),  # the file uses settings.json's name
    ):
        path.write_text(line + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


@pytest.mark.parametrize("side", ["seeder's upload", "leech's download"])
def test_a_throttle_paces_a_session(tmp_path: Path, side: str) -> None:
    """Two sessions over loopback TCP: a throttle on either end holds the transfer to
    its rate (a lower bound only: a slow machine can only take longer)."""
    from test_session import connect, make_torrent, new_session

    m, _content = make_torrent(tmp_path / "seed")
    made: list[TorrentSession] = []
    try:
        seeder = new_session(made, m, tmp_path / "seed")
        leech = new_session(made, m, tmp_path / "leech")
        throttle = Throttle()
        throttle.set_rate(RATE)
        if side == "seeder's upload":
            seeder.upload_throttles = (throttle,)
        else:
            leech.download_throttles = (throttle,)
        started = time.monotonic()
        connect(seeder, leech, "leech", "seeder")
        assert leech.wait_complete(timeout=60)
        took = time.monotonic() - started
        # 1.4 MB at 600 kB/s: 2.2 s (less one burst); unthrottled: a tenth of a second
        assert took > 0.6 * m.total_length / RATE, took
    finally:
        for s in made:
            s.close()


RATE = 600_000
