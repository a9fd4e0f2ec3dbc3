"""A tracker killed with SIGKILL while its writer thread writes comes back consistent.

A real tracker process (real SQLite, the writer thread) serves a stream of
joins, re-announces and leaves; the test kills it with SIGKILL while a write is
under way, checks the database (integrity, no link or swarm row naming a peer
that is not there, NIDs unique per peer, degrees within bounds, nothing that
was reported committed lost, every peer with its edges: each change is written
whole or not at all), restores a tracker from it, and starts the
process again on the same state: three times.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from anomos.pluginmanager import get_plugins
from anomos.tracker.limits import LimitSettings
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings
from anomos.tracker.store import DB_FILE

MIN_NEIGHBOURS, MAX_NEIGHBOURS = 4, 6

#: The tracker process: announces as fast as it can (joins, re-announces, leaves) and
#: says "busy N" while a write is under way, "committed N" once a write of the state
#: after N announces is known to be in the database.
CHILD = r"""
import os, random, sys
import gevent
import anomos.tracker.persistence
from anomos.pluginmanager import get_plugins
from anomos.tracker.limits import LimitSettings
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

settings = TrackerSettings(limits=LimitSettings.unlimited(), rate=1e12, burst=1e12, edge_settle=0.0)
# Seconds between graph images: none but the first (the restart reads every link written
# since), or some among the writes that are killed.
anomos.tracker.persistence.IMAGE_INTERVAL = float(sys.argv[2])
t = Tracker(sys.argv[1], "127.0.0.1:0", get_plugins(load_entrypoints=False), settings)
t.start()
store, submitted = t.store, []
submit = store.submit

def counted_submit(batch):
    accepted = submit(batch)
    if accepted:
        submitted.append(batch.meta.get("announces", 0))
    return accepted

store.submit = counted_submit
rng = random.Random()
ih = [bytes([i]) * 20 for i in range(4)]
live = list(t.peers)
onion, box = os.urandom(32), os.urandom(32)
while True:
    r = rng.random()
    if r < 0.15 and live:
        peer = live.pop(rng.randrange(len(live)))
        stopped = 1
    elif r < 0.4 and live:
        peer, stopped = rng.choice(live), 0
    else:
        peer, stopped = os.urandom(32), 0
        live.append(peer)
    torrent = {b"infohash": rng.choice(ih), b"uploaded": rng.randrange(1 << 30),
               b"downloaded": 0, b"left": rng.choice([0, 1 << 30]), b"event": b""}
    t.announce(peer, {b"session": b"s", b"onion": onion, b"box": box,
                      b"address": b"10.1.2.3:6881", b"torrents": [torrent],
                      b"relayed": 0, b"stopped": stopped})
    if len(submitted) > 1 or (submitted and not store.busy):
        print("committed", submitted.pop(0), flush=True)
    if store.busy and submitted:
        print("busy", t.announces, flush=True)
    gevent.sleep(0)
"""


def check_database(path: Path) -> int:
    """Assert the database is consistent; the announces counter it holds."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        ids = {i for (i,) in db.execute("SELECT id FROM peers")}
        links = db.execute("SELECT a, b, nid, dialer FROM links").fetchall()
        assert all(a < b and a in ids and b in ids for a, b, _, _ in links)
        assert all(d in (0, a, b) for a, b, _, d in links)
        degree: Counter[int] = Counter()
        nids = set()
        for a, b, nid, _ in links:
            degree[a] += 1
            degree[b] += 1
            for end in (a, b):
                assert (end, nid) not in nids, "an NID used twice by one peer"
                nids.add((end, nid))
        assert max(degree.values(), default=0) <= MAX_NEIGHBOURS
        # Every join, leave and split is written whole: no peer without its edges.
        assert len(ids) > 2 * MAX_NEIGHBOURS
        assert min(degree[i] for i in ids) >= MIN_NEIGHBOURS
        assert {p for (p,) in db.execute("SELECT DISTINCT peer FROM swarm")} <= ids
        (announces,) = db.execute("SELECT value FROM meta WHERE key = 'announces'").fetchone()
        return int(announces)
    finally:
        db.close()


def db_links(path: Path) -> list[tuple[int, int, int, int]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT a, b, nid, dialer FROM links").fetchall()
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.integration
def test_a_tracker_killed_while_writing_restarts_consistent(tmp_path: Path) -> None:
    state = tmp_path / "tracker"
    state.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    plugins = get_plugins(load_entrypoints=False)
    kills_while_busy = 0
    for image_interval in (1e9, 1e9, 1.5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), str(image_interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        committed, commits, busy = 0, 0, False
        deadline = time.monotonic() + 120
        try:
            for line in child.stdout:
                word, value = line.split()
                if word == "committed":
                    committed, commits = int(value), commits + 1
                # A few transactions in, kill it in the middle of the next one.
                elif word == "busy" and commits >= 2:
                    busy = True
                    break
                assert time.monotonic() < deadline, "the tracker process wrote too little"
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert busy, "the tracker process ended before it could be killed"
        kills_while_busy += busy
        announces = check_database(state / DB_FILE)
        assert announces >= committed  # nothing reported committed is lost

        # The restored tracker holds exactly what the database holds, consistently.
        t = Tracker(
            state, "127.0.0.1:0", plugins, TrackerSettings(limits=LimitSettings.unlimited())
        )
        try:
            db = sqlite3.connect(f"file:{state / DB_FILE}?mode=ro", uri=True)
            (stored,) = db.execute("SELECT count(*) FROM peers").fetchone()
            db.close()
            assert len(t.peers) == stored > 0
            # The graph is exactly the stored links (restored from the image and the
            # links written since, or from the links alone), every one of them.
            links = {(a, b): nid for a, b, nid, _ in db_links(state / DB_FILE)}
            seq = t.graph.seq
            assert {
                (min(seq(e.a), seq(e.b)), max(seq(e.a), seq(e.b))): e.nid for e in t.graph.edges()
            } == links
            assert t.announces >= announces
            for a in t.graph:
                for b in t.graph.neighbours(a):
                    assert a in t.graph.neighbours(b)
                    assert t.graph.nid(a, b) == t.graph.nid(b, a)
            assert all(set(s.rows) <= set(t.peers) for s in t.swarms.values())
        finally:
            t.stop()
    assert kills_while_busy == 3
