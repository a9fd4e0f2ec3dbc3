"""A timeline of a session's connections, for tracing the flow control on a WAN.

With ``ANOMOS_FLOW_TRACE=DIR`` in the environment every torrent session of the
process writes one JSON line every :data:`INTERVAL` seconds to
``DIR/<label>-<pid>.jsonl``: the session's bytes received, thrown away and
left, and per connection its bytes in both directions, the bytes of requests
outstanding (ours) or queued (the peer's, at a source) and what its flow
controller measured and chose. Times are ``time.monotonic()``, one clock for
every process of the machine, so ``anomos bench --wan --trace`` lines them up
with what the seeder's uplink carried. A tick that comes late is itself a
finding: the process did not run.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent

from anomos.torrent.wire import BLOCK_SIZE

if TYPE_CHECKING:
    from anomos.torrent.picker import PiecePicker
    from anomos.torrent.session import PeerConnection, TorrentSession

#: The environment variable naming the folder to trace into.
TRACE_ENV = "ANOMOS_FLOW_TRACE"
#: Seconds between two lines.
INTERVAL = 0.25


def trace_dir() -> Path | None:
    """Where to trace, from the environment (None: no tracing)."""
    folder = os.environ.get(TRACE_ENV)
    return Path(folder) if folder else None


def run(session: TorrentSession, folder: Path) -> None:
    """Write the session's timeline until it closes (a greenlet's body)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]", "_", session.label)[:40]
    with open(folder / f"{name}-{os.getpid()}.jsonl", "a", encoding="utf-8") as out:
        while True:
            out.write(json.dumps(sample(session), separators=(",", ":")) + "\n")
            out.flush()
            gevent.sleep(INTERVAL)


def sample(session: TorrentSession) -> dict[str, Any]:
    """One line of the timeline."""
    picker = session.picker
    return {
        "t": round(time.monotonic(), 4),
        "received": session.downloaded,
        "wasted": session.wasted,
        "uploaded": session.uploaded,
        "left": session.left,
        "endgame": picker.in_endgame,
        "conns": [_conn(c, picker) for c in session.connections],
    }


def _conn(conn: PeerConnection, picker: PiecePicker) -> dict[str, Any]:
    flow = conn.flow
    state = "probe" if flow.probing_rtt else "startup" if flow.startup else "cruise"
    return {
        "c": conn.label,
        "down": conn.downloaded,
        "up": conn.uploaded,
        "out": picker.outstanding(conn) * BLOCK_SIZE if conn.handshaken else 0,
        "queued": len(conn.requests),
        "win": flow.window,
        "rate": round(flow.rate),
        "rtt": round(flow.min_rtt, 4) if math.isfinite(flow.min_rtt) else None,
        "state": state,
        "choked": conn.peer_choking,
    }
