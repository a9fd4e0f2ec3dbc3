"""Which peers are in which torrent's swarm: the sources the planner picks from.

An announce lists every torrent the peer has, so its membership is made
exactly that list (minus ``stopped`` ones) each time; a peer that leaves the
network leaves every swarm. The largest size a swarm ever reached is kept
per torrent (written with the other changes, for ``/stats`` and restore). The
:class:`~anomos.tracker.planner.Swarm` objects themselves belong to the planner.
"""

from __future__ import annotations

from collections.abc import Iterator

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
        """Take the sizes and the swarm rows (of ``live`` peers) from a snapshot, a swarm
        at a time (a call per row was 7 s of a 10^6 restart), keyed by the graph's own
        identity objects (the snapshot's are let go with it: kept, they would pin the
        allocator's pools they share with the freed rows), ``left`` shared with the
        swarm's size where equal (_shared_left)."""
        self.sizes.update(snap.torrents)
        for ih, members in snap.swarm.items():
            swarm = self._swarm(ih)
            size = max(swarm.size, max(members.values(), default=0))
            swarm.size = size
            try:
                peers = live.own_all(members)
            except KeyError:  # a member not in the graph (never after a sound restore)
                members = {p: left for p, left in members.items() if live.own(p) is not None}
                peers = live.own_all(members)
            lefts = [size if left == size else left for left in members.values()]
            swarm.load(dict(zip(peers, lefts, strict=True)))
            self.peer_torrents.load(ih, peers)

    def members(self) -> Iterator[tuple[bytes, dict[bytes, int]]]:
        """Each torrent and its members' bytes left (copies: the store's writer thread
        packs them while serving goes on)."""
        for ih, swarm in list(self.swarms.items()):
            yield ih, swarm.lefts()  # type: ignore[misc]

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
