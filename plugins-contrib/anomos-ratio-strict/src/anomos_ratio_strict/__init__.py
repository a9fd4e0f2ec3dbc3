"""Ratio policies that give relaying less credit than anomos' default.

anomos' built-in ``relay-credit`` policy counts every relayed byte as an
uploaded byte. To measure how much that incentive matters, a researcher needs
the alternatives on the same network:

``strict``
    relayed bytes earn nothing: ratio = uploaded / downloaded, as in BitTorrent.
``capped``
    relayed bytes count, but never more than ``CappedRelayCredit.factor`` times
    what the peer uploaded itself, so relaying can raise a sharer's ratio but
    cannot replace sharing.

Select one on the tracker: ``anomos tracker --ratio-policy strict ...``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from anomos import hookimpl

__version__ = "0.1.0"


def _ratio(credited: int, downloaded: int) -> float:
    """Same edge cases as the built-in policy: nothing downloaded is 0 or infinity."""
    if downloaded <= 0:
        return float("inf") if credited > 0 else 0.0
    return credited / downloaded


class StrictRatio:
    """ratio = uploaded / downloaded; relayed bytes are ignored."""

    name: ClassVar[str] = "strict"

    def credited_upload(self, uploaded: int, relayed: int) -> int:
        # Counters come from announces: never let a negative one lower or flip a ratio.
        return max(0, uploaded)

    def ratio(self, uploaded: int, downloaded: int, relayed: int) -> float:
        return _ratio(self.credited_upload(uploaded, relayed), downloaded)


class CappedRelayCredit:
    """ratio = (uploaded + min(relayed, factor * uploaded)) / downloaded.

    Subclass and change ``factor`` (and ``name``) to compare other caps.
    """

    name: ClassVar[str] = "capped"
    #: Relay credit may be at most this multiple of the peer's own upload.
    factor: ClassVar[float] = 1.0

    def credited_upload(self, uploaded: int, relayed: int) -> int:
        uploaded, relayed = max(0, uploaded), max(0, relayed)
        return uploaded + min(relayed, int(uploaded * self.factor))

    def ratio(self, uploaded: int, downloaded: int, relayed: int) -> float:
        return _ratio(self.credited_upload(uploaded, relayed), downloaded)


@hookimpl
def anomos_register_ratio_policies(registry: Any) -> None:
    registry.add(StrictRatio.name, StrictRatio)
    registry.add(CappedRelayCredit.name, CappedRelayCredit)
