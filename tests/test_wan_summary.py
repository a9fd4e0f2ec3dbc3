"""The WAN benchmark's summary: anomos' first byte counts from its launch, and the
part after the first byte leaves out everything before it (no root needed)."""

from __future__ import annotations

from typing import Any

from anomos.bench.wan import (
    fast_start_table,
    start_trouble,
    summarize,
    summarize_fast_start,
    table,
)

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


def test_fast_start_medians_per_tree_and_the_trouble_in_the_logs(
    tmp_path: Any, capsys: Any
) -> None:
    """`bench --wan --fast-start`: each tree's steps are medians of its own runs, the
    loop-to-first-block span is taken per run, and trouble is counted from the logs."""
    t = "2026-12-05 17:11:0"
    (tmp_path / "get.log").write_text(
        f"{t}1,000 anomos.net.link INFO cannot link to NID 5 at 127.0.1.3:4: timed out\n"
        f"{t}1,100 anomos.peer.download INFO no circuits: announce before requesting circuits\n"
        f"{t}1,200 anomos.net.link INFO refused link from 127.0.1.9:5: connection closed while "
        "waiting for AUTH\n"  # the tracker's reachability probe: no trouble
    )
    (tmp_path / "relay0.log").write_text(
        f"{t}0,000 anomos.net.link INFO refused link from 127.0.1.4:5: reset\n"  # before get
        f"{t}2,000 anomos.net.link INFO refused link from 127.0.1.9:5: bad edge ticket\n"
        f"{t}2,100 anomos.net.link INFO NID 5 admitted on its edge ticket\n"
    )
    trouble = start_trouble(tmp_path)
    assert trouble == {
        "dial_failures": 1,
        "circuit_refusals": 1,
        "links_refused": 1,
    }
    shown = capsys.readouterr().err  # each count with its line
    assert "circuit_refusals in get.log: " + t + "1,100" in shown
    assert "links_refused in relay0.log: " + t + "2,000" in shown and "AUTH" not in shown

    def report(download: float, block: float, piece: float) -> dict[str, Any]:
        return {
            "startup": {"download": download, "first_block": block, "first_piece": piece},
            "first_byte_seconds": block,
            "circuits": [{"relays": 3, "setup_seconds": block - download - 0.5}],
            "failed_circuits": 0,
            "start_trouble": trouble,
        }

    old = [report(4.0, 8.0, 8.1), report(5.0, 8.5, 8.6), report(4.5, 9.0, 9.1)]
    new = [report(3.0, 5.0, 5.1), report(3.5, 5.0, 5.1), report(2.0, 4.5, 4.6)]
    result = {"fast_start": [{"profile": "p", "trees": {"old": old, "this tree": new}}]}
    rows = summarize_fast_start(result)
    assert [r["tree"] for r in rows] == ["old", "this tree"]
    assert rows[0]["startup"]["first_piece"] == 8.6 and rows[1]["startup"]["first_piece"] == 5.1
    assert rows[0]["loop_to_first_block"] == 4.0  # 4.0, 3.5, 4.5: per run, not medians' gap
    assert rows[1]["loop_to_first_block"] == 2.0  # 2.0, 1.5, 2.5
    assert rows[1]["trouble"]["dial_failures"] == 3
    text = fast_start_table(rows)
    assert "| first_piece | 8.6 | 5.1 |" in text
    assert "| download loop start -> first block | 4.0 | 2.0 |" in text


def test_wasted_is_what_came_beyond_the_missing_bytes() -> None:
    """Bytes received beyond the file (endgame copies, blocks asked twice): a median
    fraction per profile, in the table's last column."""
    runs = []
    for got in (21 * MB, 22 * MB, 30 * MB):
        one = run(5.0, None)
        one["anomos"] |= {"left_at_start": 20 * MB, "downloaded": got}
        runs.append(one)
    (row,) = summarize({"size": 20 * MB, "profiles": [{"profile": "p", "runs": runs}]})
    assert row["wasted"] == 0.1
    assert table([row]).splitlines()[2].endswith("| 0.1 |")
    (row,) = summarize({"size": 20 * MB, "profiles": [{"profile": "p", "runs": [run(5.0, None)]}]})
    assert row["wasted"] is None  # (summaries without the figures)
