"""The one retry helper (anomos/backoff.py): growing, capped, jittered pauses, and
waiting states logged once when they start and once when they end."""

from __future__ import annotations

import logging
import random
import re

import pytest

from anomos.backoff import Backoff, Waiting


def test_pauses_grow_to_the_limit_with_jitter_and_reset() -> None:
    b = Backoff(1.0, 8.0, rng=random.Random(1))
    centres = []
    for _ in range(6):
        centres.append(b.delay)
        pause = b.next()
        assert 0.75 * centres[-1] <= pause <= 1.25 * centres[-1]
    assert centres == [1, 2, 4, 8, 8, 8]
    b.reset()
    assert b.delay == 1.0


def test_a_pause_is_never_shorter_than_asked() -> None:
    b = Backoff(0.25, 5.0)
    assert b.next(at_least=30.0) == 30.0
    assert b.delay == 0.5  # it still grows


def test_a_waiting_state_is_one_line_when_it_starts_and_one_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.backoff")
    w = Waiting("waiting for the tracker", log)
    caplog.set_level(logging.INFO, logger="test.backoff")
    assert not w.active and w.describe() == ""
    for _ in range(50):
        w.enter("cannot reach it")
    assert w.active
    assert re.fullmatch(
        r"waiting for the tracker since \d\d:\d\d:\d\d \(cannot reach it\)", w.describe()
    )
    w.leave()
    w.leave()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("waiting for the tracker since")
    assert re.search(r": over after \d+ s$", lines[1])
    assert not w.active
