"""The WAN benchmark's summary: anomos' first byte counts from its launch, and the
part after the first byte leaves out everything before it (no root needed)."""

from __future__ import annotations

from typing import Any

from anomos.bench.wan import summarize, table

MB = 10**6


def run(first_byte: float, startup: dict[str, float] | None) -> dict[str, Any]:
    anomos: dict[str, Any] = {
        "seconds": 10.0,  # from the download loop's start
        "first_byte_seconds": first_byte,
        "circuits": [
            {"relays": 2, "received": 6 * MB, "seconds": 4.0, "setup_seconds": 0.5},
            {"relays": 3, "received": 4 * MB, "seconds": 4.0, "setup_seconds": 0.9},
        ],
        "failed_circuits": 0,
    }
    if startup is not None:
        anomos["startup"] = startup
    libtorrent = {"seconds": 5.0, "first_byte": 1.0, "launch_seconds": 6.0}
    return {"libtorrent": libtorrent, "anomos": anomos}


def test_first_byte_from_launch_and_the_rate_after_it() -> None:
    # Launched, the download loop began 3 s later and the first block came 2 s
    # after that: 5 s from launch, and the 10 s download had 8 s after its first byte.
    new = run(5.0, {"download": 3.0, "first_block": 5.0, "first_piece": 5.2})
    old = run(2.0, None)  # an older anomos counted from the download's start
    for one in (new, old):
        (row,) = summarize({"size": 20 * MB, "profiles": [{"profile": "p", "runs": [one]}]})
        assert row["anomos_after_first_byte_mbs"] == 20 / 8
        assert row["libtorrent_after_first_byte_mbs"] == 20 / 5
        assert row["ratio"] == round((20 / 10) / (20 / 5), 2)
        assert row["circuit_setup_seconds"] == 0.7
    (row,) = summarize({"size": 20 * MB, "profiles": [{"profile": "p", "runs": [new, new]}]})
    assert row["anomos_first_byte"] == 5.0
    assert list(row["anomos_startup"]) == ["download", "first_block", "first_piece"]
    assert "first_piece 5.2" in table([row])
