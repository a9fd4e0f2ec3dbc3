"""``anomos demo``, the README's main job, end to end as a user runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anomos.testing import run_anomos

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_downloads_anonymously_and_shows_hop_counts_only(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = run_anomos("demo", "--size", "3MiB", "--dir", str(work), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout

    # The file arrived intact: the demo says so, and the kept files agree.
    assert re.search(r"^verified  SHA-256 [0-9a-f]{16}\.\.\. matches the original$", out, re.M)
    original = (work / "share" / "demo.bin").read_bytes()
    assert len(original) == 3 << 20
    assert (work / "download" / "demo.bin").read_bytes() == original

    # Several sources at once, each over a circuit of 2 to 4 relays (the
    # tracker's default), reported by hop count and never by address.
    used = re.search(r"^circuits  (\d+) used", out, re.M)
    assert used and int(used[1]) >= 2, out
    section = out[used.start() : out.index("\nthroughput")]
    hops = [int(n) for n in re.findall(r"circuit \d+: (\d+) relays between", section)]
    assert len(hops) == int(used[1]) and all(2 <= n <= 4 for n in hops), section
    assert not re.search(r"\d+\.\d+\.\d+\.\d+|:\d{4,5}\b", section), section
    assert re.search(r"^throughput [\d.]+ MB/s", out, re.M)

    # The peers that carried circuits earned credit at the tracker for it.
    # Seeders relay for each other too, and the tracker may route every busy
    # circuit through them, so the credit is looked for on every peer.
    relayed = [
        float(m) for m in re.findall(r"^  (?:relay|seeder)\d+ .* relayed +([\d.]+) MB", out, re.M)
    ]
    assert len(relayed) == 7 and max(relayed) > 0, out
