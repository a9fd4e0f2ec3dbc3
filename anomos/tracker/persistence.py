"""Getting the tracker's changes to disk without ever making a request wait for it.

The handlers record what they change in one pending
:class:`~anomos.tracker.store.Batch`; once a second, or after
``flush_max_pending`` announces, it is handed to the store's writer thread
(:meth:`~anomos.tracker.store.Store.submit`), unless that thread is still
writing the previous one: then the changes keep accumulating and go next time.
A crash loses at most the last second or so; peers simply announce again.
The same loop moves the tracker's long-lived objects out of the garbage
collector's sight now and then (:func:`freeze`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import gevent

from anomos.tracker.store import Batch, Snapshot, Store

#: Seconds between writes of accumulated changes to the database (a crash loses at most
#: this much, plus a write under way; peers simply announce again).
FLUSH_INTERVAL = 1.0
#: Seconds between moves of the surviving objects out of the garbage collector's sight
#: (gc.freeze): a full collection then walks only what is younger, not a million peers'
#: state (a stall of seconds). Cyclic garbage still alive at that moment is never
#: collected: a few in-flight requests' worth every few minutes.
FREEZE_INTERVAL = 300.0
#: ... or sooner, once the peer count moved by this much: a full collection walks what
#: was made since the last freeze (50,000 new peers: a 93 ms stall), so joins bound it.
FREEZE_PEERS = 10_000


def freeze() -> None:
    """Collect the young generations, then exempt every surviving object from future
    collections: the tracker's state is long-lived, and walking it would stall serving."""
    gc.collect(1)
    gc.freeze()


class Persistence:
    """The pending changes of one tracker and its write-behind to the store."""

    def __init__(
        self, state_dir: Path, meta: Callable[[], dict[str, int]], *, flush_max_pending: int
    ) -> None:
        self.store = Store(state_dir)
        #: The counters written with every batch (``/stats``'s totals).
        self._meta = meta
        self.flush_max_pending = flush_max_pending
        #: What changed since the last hand-over to the writer.
        self.pending = Batch()
        self._pending_count = 0

    def load(self) -> Snapshot:
        return self.store.load()

    def changed(self) -> None:
        """One more request changed state: hand the batch over once enough piled up."""
        self._pending_count += 1
        if self._pending_count >= self.flush_max_pending:
            self.write_behind()

    def write_behind(self) -> None:
        """Hand the changes to the store's writer thread, unless it is still busy
        with the previous ones (then they keep accumulating: serving never waits)."""
        if self.store.busy:
            return
        self.store.submit(self._take())

    def flush(self) -> None:
        """Write the changes made since the last flush now, in one transaction."""
        self.store.write(self._take())

    def close(self) -> None:
        """Write what is pending and close the database."""
        self.flush()
        self.store.close()

    def run(self, peer_count: Callable[[], int]) -> None:
        """The background loop: write behind every FLUSH_INTERVAL; freeze every
        FREEZE_INTERVAL, or once ``peer_count()`` moved by FREEZE_PEERS."""
        frozen, peers_frozen = time.monotonic(), peer_count()
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            if self._pending_count:
                self.write_behind()
            peers = peer_count()
            if time.monotonic() - frozen >= FREEZE_INTERVAL or (
                abs(peers - peers_frozen) >= FREEZE_PEERS
            ):
                frozen, peers_frozen = time.monotonic(), peers
                freeze()

    def _take(self) -> Batch:
        batch, self.pending, self._pending_count = self.pending, Batch(), 0
        batch.meta.update(self._meta())
        return batch
