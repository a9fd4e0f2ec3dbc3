"""Share ratios: what each identity is credited, and who gets no circuits for it.

Peers report cumulative counters per session (uploaded and downloaded per
torrent, bytes relayed); the tracker credits the increase over the last
report. A claim of relaying or uploading is never taken on trust: it counts only
as far as the peer's neighbours confirm, in their own announces' receipts, link
bytes they received from it. The ratio policy plugin turns the credited
counters into the ratio; ``min_ratio`` refuses circuits to peers below it past
a grace allowance. Accounts are written behind with the other changes (the
:class:`~anomos.tracker.store.Batch` each call is given); receipt baselines
live in memory only.
"""

from __future__ import annotations

import math
from typing import Any

from anomos.interfaces import RatioPolicy
from anomos.tracker.graph import PeerGraph
from anomos.tracker.requests import AnnounceRequest
from anomos.tracker.store import Account, Batch
from anomos.tracker.tables import AccountTable, ReceiptBaselines

#: Torrents whose last reported counters are remembered per identity.
MAX_REPORTS = 1024


def _confirmed_upload(account: Account) -> int:
    """Uploaded bytes credited: the peer's claim, as far as its neighbours' receipts
    confirm link bytes from it that the relay credit has not used already.

    A source's uploads leave it over its links like the cells it relays, so the
    receipts bound both together: what a peer says it uploaded is never taken on
    trust (it could claim 10^13 bytes), only the bytes others saw leave it.
    """
    return min(account.uploaded, max(0, account.relayed_confirmed - account.relayed))


def _add_delta(reported: int, last: int) -> int:
    """Bytes to credit from a cumulative counter; a smaller value means it was reset."""
    return reported - last if reported >= last else reported


class Accounting:
    """Every identity's account, and the receipt baselines of the current sessions."""

    def __init__(
        self, ratio: RatioPolicy, graph: PeerGraph, *, min_ratio: float, ratio_grace: int
    ) -> None:
        self.ratio = ratio
        #: Whose neighbour sits at a reporter's NID (receipts name NIDs).
        self.graph = graph
        #: Share ratio a peer needs to be given circuits once it downloaded more than
        #: ``ratio_grace`` bytes (0: no minimum). Relaying raises it: see refusal.
        self.min_ratio = min_ratio
        self.ratio_grace = ratio_grace
        #: identity -> account, packed by graph slot (reading gives a copy: store it back)
        self.accounts = AccountTable(graph)
        #: reporter -> its receipt baselines (not persisted: see _confirm), by graph slot
        self.receipts = ReceiptBaselines(graph)

    def announce(self, peer: bytes, request: AnnounceRequest, batch: Batch) -> Account:
        """Credit what an announce reports (its own counters, and its neighbours'
        relaying through its receipts); the peer's account."""
        fresh = (self.accounts.session(peer) or b"") != request.session
        account = self._credit(peer, request.session, request.relayed, request.torrents, batch)
        self._confirm(peer, fresh, request.receipts, batch)
        if request.stopped:
            self.receipts.forget(peer)
        return account

    def joined(self, peer: bytes, batch: Batch) -> None:
        """``peer`` entered the graph: its account and receipt state move into its slot
        (the move logged in ``batch``: the tables' image may catch it half-way)."""
        if self.accounts.joined(peer):
            batch.moved_accounts.add(peer)
        self.receipts.joined(peer)

    def leaving(self, peer: bytes, batch: Batch) -> None:
        """``peer`` leaves the graph (call before it does): its account is kept by
        identity (the move logged in ``batch``), its receipt baselines go."""
        if self.accounts.leaving(peer):
            batch.moved_accounts.add(peer)
        self.receipts.leaving(peer)

    def summary(self, account: Account) -> dict[bytes, Any]:
        """The account's part of an announce reply (byte-string keys)."""
        ratio = self.ratio_of(account)
        return {
            b"ratio": b"inf" if math.isinf(ratio) else f"{ratio:.6f}".encode(),
            b"uploaded": _confirmed_upload(account),
            b"uploaded_claimed": account.uploaded,
            b"downloaded": account.downloaded,
            b"relayed": account.relayed,
            b"relayed_claimed": account.relayed_claimed,
        }

    def ratio_of(self, account: Account) -> float:
        """The ratio plugin's share ratio, with the uploaded and relayed bytes
        neighbours confirmed."""
        return self.ratio.ratio(_confirmed_upload(account), account.downloaded, account.relayed)

    def refusal(self, peer: bytes) -> str | None:
        """Why ``peer`` gets no circuits under this tracker's minimum ratio, or None.

        Only downloads past the grace allowance count; the peer keeps relaying
        (and seeding) meanwhile, which is how it earns its way back.
        """
        if not self.min_ratio:
            return None
        account = self.accounts.get(peer)
        if account is None or account.downloaded <= self.ratio_grace:
            return None
        ratio = self.ratio_of(account)
        if ratio >= self.min_ratio:
            return None
        return (
            f"share ratio {ratio:.2f} is below this tracker's minimum {self.min_ratio:g}: "
            "seed or relay for others to raise it"
        )

    def _credit(
        self,
        peer: bytes,
        session: bytes,
        relayed: int,
        torrents: dict[bytes, tuple[int, int, int, str]],
        batch: Batch,
    ) -> Account:
        """Add what the peer reports beyond its last report in this session to its totals
        (and mark the account for writing only if that changed anything)."""
        account = self.accounts.get(peer)
        changed = account is None or account.session != session
        if account is None:
            account = self.accounts[peer] = Account()
        if account.session != session:
            # A new session: its counters start from zero, so every baseline does too.
            account.session, account.relayed_reported = session, 0
            account.reports.clear()
            batch.clear_reports(peer)
        if relayed != account.relayed_reported:
            account.relayed_claimed += _add_delta(relayed, account.relayed_reported)
            account.relayed_reported = relayed
            changed = True
        for ih, (up, down, _left, _event) in torrents.items():
            last = account.reports.get(ih)
            if last == (up, down):
                continue
            last_up, last_down = last or (0, 0)
            account.uploaded += _add_delta(up, last_up)
            account.downloaded += _add_delta(down, last_down)
            account.reports[ih] = (up, down)
            batch.set_report(peer, ih, (up, down))
            changed = True
        if len(account.reports) > MAX_REPORTS:
            # Forget torrents the peer no longer lists (bounds memory per identity).
            for ih in [ih for ih in account.reports if ih not in torrents]:
                del account.reports[ih]
                batch.remove_report(peer, ih)
            changed = True
        if changed:
            self.accounts[peer] = batch.accounts[peer] = account
        return account

    def _confirm(
        self,
        reporter: bytes,
        fresh: bool,
        receipts: dict[int, int],
        batch: Batch,
    ) -> None:
        """Credit each neighbour what ``reporter`` received from it since its last receipt.

        Receipts are cumulative per session and NID, like the other counters. For
        an NID that is not one of the reporter's edges nobody is credited. The
        baselines live in memory only: after a tracker restart, the first receipt
        of each NID in a session already under way is a baseline only, never credit.
        ``fresh``: this announce starts a session the tracker had not seen.
        """
        # Baselines start with a session the tracker had not seen (``fresh``: its
        # counters started at zero), or are picked up mid-session by a restarted
        # tracker (first receipts are baselines only: what came before them may have
        # been credited already). A sender is known by its join sequence number.
        from_start = self.receipts.begin(reporter, fresh)
        last = self.receipts.last(reporter)
        now: list[tuple[int, int, int]] = []
        for nid, received in receipts.items():
            sender: Any = self.graph.peer_by_nid(reporter, nid)
            if sender is None:
                continue
            seq = self.graph.seq(sender)
            now.append((nid, seq, received))
            before = last.get(nid)
            if before is not None and before[0] == seq:
                delta = _add_delta(received, before[1])
            elif from_start:
                delta = received  # a new neighbour at this NID: its counter began at zero
            else:
                continue  # picked up mid-session: a baseline only
            if delta:
                account = self.accounts.get(sender) or Account()
                account.relayed_confirmed += delta
                self.accounts[sender] = batch.accounts[sender] = account
        self.receipts.set_last(reporter, now)
