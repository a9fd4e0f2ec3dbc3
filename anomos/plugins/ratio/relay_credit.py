"""Default ratio accounting: relayed bytes count as uploaded bytes.

Relaying for others is how a peer with nothing popular to share still earns
its ratio, as the original Anomos intended (and never actually credited). The
tracker passes only uploaded and relayed bytes the peer's neighbours confirmed
receiving, never a bare claim.
"""

from __future__ import annotations

from typing import Any, ClassVar

from anomos import hookimpl


class RelayCreditRatio:
    """ratio = (uploaded + relayed) / downloaded."""

    name: ClassVar[str] = "relay-credit"

    def credited_upload(self, uploaded: int, relayed: int) -> int:
        return uploaded + relayed

    def ratio(self, uploaded: int, downloaded: int, relayed: int) -> float:
        credited = self.credited_upload(uploaded, relayed)
        if downloaded <= 0:
            return float("inf") if credited else 0.0
        return credited / downloaded


@hookimpl
def anomos_register_ratio_policies(registry: Any) -> None:
    registry.add(RelayCreditRatio.name, RelayCreditRatio)
