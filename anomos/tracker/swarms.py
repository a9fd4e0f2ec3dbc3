"""Which peers are in which torrent's swarm: the sources the planner picks from.

An announce lists every torrent the peer has, so its membership is made
exactly that list (minus ``stopped`` ones) each time; a peer that leaves the
network leaves every swarm. The largest size a swarm ever reached is kept
per torrent (written with the other changes, for ``/stats`` and restore). The
:class:`~anomos.tracker.planner.Swarm` objects themselves belong to the planner.
"""

from __future__ import annotations

from anomos.tracker.planner import Swarm
from anomos.tracker.store import Batch, Snapshot, SwarmRow
from anomos.tracker.tables import PeerTable, TorrentsByPeer


def _shared_left(left: int, swarm: Swarm) -> int:
    """``left`` as the swarm's own size object when it equals it (a peer that has
    nothing yet: most of a new torrent's swarm), so that its members share one int
    instead of 32 B each; 0, a seed's, is shared by Python itself."""
    return swarm.size if left == swarm.size else left


class Swarms:
    """Every torrent's swarm, and each peer's torrents (to leave them all at once)."""

    def __init__(self) -> None:
        #: infohash -> its live swarm (absent once empty)
        self.swarms: dict[bytes, Swarm] = {}
        #: peer -> infohashes of the swarms it is in
        self.peer_torrents = TorrentsByPeer()
        #: infohash -> the largest size its swarm reached
        self.sizes: dict[bytes, int] = {}

    def update(
        self, peer: bytes, pid: int, torrents: dict[bytes, tuple[int, int, int, str]], batch: Batch
    ) -> None:
        """Make the peer's swarm membership exactly the torrents it listed (minus stopped
        ones); ``pid`` is its id in the store."""
        mine = self.peer_torrents.setdefault(peer, set())
        for ih in list(mine):
            if ih not in torrents or torrents[ih][3] == "stopped":
                self._leave(peer, pid, ih, batch)
        for ih, (up, down, left, event) in torrents.items():
            if event == "stopped":
                continue
            swarm = self._swarm(ih)
            before = swarm.rows.get(peer)
            swarm.set(peer, SwarmRow(_shared_left(left, swarm), up, down))
            mine.add(ih)
            if before is None or before.left != left:  # the counters are in its account
                batch.set_swarm(ih, pid, left)
            if swarm.size > self.sizes.get(ih, -1):
                self.sizes[ih] = swarm.size
                batch.torrents[ih] = swarm.size

    def remove_peer(self, peer: bytes, pid: int, batch: Batch) -> None:
        """The peer leaves every swarm it is in."""
        for ih in list(self.peer_torrents.get(peer, ())):
            self._leave(peer, pid, ih, batch)
        self.peer_torrents.pop(peer, None)

    def restore(self, snap: Snapshot, live: PeerTable) -> None:
        """Take the sizes and the swarm rows of the ``live`` peers from a snapshot, keyed
        by the graph's own identity objects (the snapshot's are let go with it)."""
        self.sizes.update(snap.torrents)
        own = live.own
        for ih, peer, row in snap.swarm:
            mine = own(peer)
            if mine is not None:
                swarm = self._swarm(ih)
                # A new row, not the snapshot's changed: freeing its int now would leave
                # a hole for the next long-lived object, pinning the snapshot's memory.
                swarm.set(mine, SwarmRow(_shared_left(row.left, swarm)))
                self.peer_torrents.add(mine, ih)

    def _swarm(self, ih: bytes) -> Swarm:
        swarm = self.swarms.get(ih)
        if swarm is None:
            swarm = self.swarms[ih] = Swarm()
            swarm.size = self.sizes.get(ih, 0)
        return swarm

    def _leave(self, peer: bytes, pid: int, ih: bytes, batch: Batch) -> None:
        swarm = self.swarms.get(ih)
        if swarm is not None:
            swarm.remove(peer)
            if not swarm:
                del self.swarms[ih]
        self.peer_torrents.get(peer, set()).discard(ih)
        batch.remove_swarm(ih, pid)
