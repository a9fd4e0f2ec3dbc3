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

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent

from anomos.tracker.graph import GraphImage
from anomos.tracker.images import TablesImage
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
#: Seconds between images of the packed graph and tables written with a batch (and on
#: close): a restart reads the last images and applies only the links and rows written
#: since, instead of every row one by one (3 * 10^6 links, 10^6 rows a table at 10^6 peers).
IMAGE_INTERVAL = 300.0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection inside: a restore makes millions of long-lived objects,
    and the collections their count would set off re-walk everything made so far
    (20 % of a restart's CPU at 10^5 peers). :func:`freeze` after it walks them once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze(collect: bool = True) -> None:
    """Collect the young generations (unless not ``collect``: after a restore, whose
    objects are all alive and few of them cyclic garbage, the walk cost ~1 s at 10^6),
    then exempt every surviving object from future collections: the tracker's state
    is long-lived, and walking it would stall serving."""
    if collect:
        gc.collect(1)
    gc.freeze()


class Persistence:
    """The pending changes of one tracker and its write-behind to the store."""

    def __init__(
        self,
        state_dir: Path,
        meta: Callable[[], dict[str, int]],
        *,
        flush_max_pending: int,
        image: Callable[[int], GraphImage] | None = None,
        tables: Callable[[int], Callable[[], TablesImage]] | None = None,
    ) -> None:
        self.store = Store(state_dir)
        #: The counters written with every batch (``/stats``'s totals).
        self._meta = meta
        #: The graph's packed image, taken with batch number n (none: never written).
        self._image = image
        #: With the graph's image: the packing of the other tables' image as of batch n
        #: (run later by the writer thread).
        self._tables = tables
        #: The number of the last batch taken (counted on from the stored one).
        self.gen = 0
        #: Whether the next batch handed to the writer takes an image of the graph along.
        self.image_due = False
        #: Whether anything was written since the last images (else new ones are not needed).
        self._changed = False
        self.flush_max_pending = flush_max_pending
        #: What changed since the last hand-over to the writer.
        self.pending = Batch()
        self._pending_count = 0

    def load(self, now: float = 0.0) -> Snapshot:
        """The stored state (peers seen ``now``); without the images in it, the next
        write behind takes them along."""
        snap = self.store.load(now)
        self.gen = snap.meta.get("gen", 0)
        self.image_due = snap.image is None or snap.columns is None
        return snap

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
        self.store.submit(self._take(image=self.image_due))

    def flush(self) -> None:
        """Write the changes made since the last flush now, in one transaction."""
        self.store.write(self._take())

    def close(self) -> None:
        """Write what is pending with the images, and close the database."""
        self.store.write(self._take(image=True))
        self.store.close()

    def run(self, peer_count: Callable[[], int]) -> None:
        """The background loop: write behind every FLUSH_INTERVAL; freeze every
        FREEZE_INTERVAL, or once ``peer_count()`` moved by FREEZE_PEERS."""
        frozen, peers_frozen = time.monotonic(), peer_count()
        imaged = time.monotonic()
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            if time.monotonic() - imaged >= IMAGE_INTERVAL:
                imaged = time.monotonic()
                self.image_due = self.image_due or self._changed
            if self._pending_count or self.image_due or self.store.holds_images:
                self.write_behind()
            peers = peer_count()
            if time.monotonic() - frozen >= FREEZE_INTERVAL or (
                abs(peers - peers_frozen) >= FREEZE_PEERS
            ):
                frozen, peers_frozen = time.monotonic(), peers
                freeze()

    def _take(self, image: bool = False) -> Batch:
        batch, self.pending, self._pending_count = self.pending, Batch(), 0
        self.gen += 1
        batch.gen = self.gen
        self._changed |= bool(batch)
        batch.meta.update(self._meta(), gen=self.gen)
        if image and self._image is not None:
            # Taken with the batch: the graph's image holds exactly the links stored up to
            # it (the tables' are packed by the writer, see anomos.tracker.images).
            batch.image = self._image(self.gen)
            if self._tables is not None:
                batch.tables = self._tables(self.gen)
            self.image_due = self._changed = False
        return batch
