"""What a download costs going back: real processes, circuits over TLS on loopback.

A downloader sends its sources request batches, SENDMEs and "nothing more"
hints, a few hundred bytes each. In full 32 KiB cells they cost 13-15 % of
what it received, on its uplink and on every relay's way back
(docs/performance.md, *Where the last 15 % goes*); in short cells (2 KiB
frames) a small fraction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_select_e2e import seeded_network

from anomos.localnet import LocalNetwork

SIZE = 16 << 20
#: Cell bytes the downloader may send per byte it receives (was 0.13-0.15).
MAX_BACKWARD = 0.03


@pytest.mark.slow
@pytest.mark.integration
def test_a_download_sends_back_a_small_fraction_of_what_it_receives(tmp_path: Path) -> None:
    share = tmp_path / "seed" / "share"
    share.mkdir(parents=True)
    data = os.urandom(SIZE)
    (share / "file.bin").write_bytes(data)
    with LocalNetwork(tmp_path / "net", verbose=1) as net:
        atorrent = seeded_network(net, share, 256 * 1024)
        summary = tmp_path / "summary.json"
        dest = tmp_path / "dest"
        args = ["get", str(atorrent), "--dest", str(dest), "--timeout", "60"]
        getter = net.start_peer("getter", *args, "--summary", str(summary), wait=False)
        assert getter.popen.wait(90) == 0, getter.log_tail()
    assert (dest / "share" / "file.bin").read_bytes() == data
    circuits = json.loads(summary.read_text())["circuits"]
    received = sum(c["received"] for c in circuits)
    sent = sum(c["cell_bytes_sent"] for c in circuits)
    assert received >= SIZE and all(c["cell_bytes_sent"] > 0 for c in circuits), circuits
    share_back = sent / received
    print(f"backward cell bytes per byte received: {share_back:.4f} ({len(circuits)} circuits)")
    assert share_back < MAX_BACKWARD, circuits
