"""UPnP-IGD port mapping (``--upnp``, off by default), through the miniupnpc library.

A peer behind a home router asks the router, over UPnP-IGD, to forward a TCP
port of its public address to the peer's listening port, and advertises that
public address to the tracker, which then finds it reachable and plans it as
a peer others dial (anomos.tracker.reachability). Off by default: it tells
the router (and anything on the LAN watching SSDP) that this machine runs a
listening service, and some users must not open ports. miniupnpc is the C
client most BitTorrent and P2P software embeds, packaged as a wheel; its calls
block, so they run in gevent's thread pool.

NAT-PMP/PCP is not spoken: the Python clients for it are unmaintained, and
routers that speak it mostly speak UPnP-IGD as well.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import gevent

from anomos.config import join_address, split_address
from anomos.errors import AnomosError

log = logging.getLogger(__name__)

#: Milliseconds to wait for routers to answer the SSDP search.
DISCOVER_MS = 2000
#: Seconds a mapping is leased for; renewed every half of it.
LEASE = 3600
DESCRIPTION = "anomos"


class PortMapError(AnomosError):
    """No mapping could be made; the message says why, in one line."""


@attrs.frozen
class PortMapping:
    """A TCP port the router forwards: ``external`` (what others dial) to ``internal``."""

    external: str
    internal: str
    #: Seconds the router keeps it (0: until removed).
    lease: int
    #: The router's control URL.
    router: str = ""


def _client() -> Any:
    try:
        import miniupnpc
    except ImportError:
        raise PortMapError("--upnp needs the miniupnpc package (pip install miniupnpc)") from None
    return miniupnpc.UPnP()


def _map(listen: str) -> tuple[Any, PortMapping]:
    """Discover the router and map ``listen``'s port (blocking)."""
    upnp = _client()
    upnp.discoverdelay = DISCOVER_MS
    try:
        if not upnp.discover():
            raise PortMapError("no UPnP router answered on the local network")
        upnp.selectigd()
        external_ip = upnp.externalipaddress()
    except PortMapError:
        raise
    except Exception as exc:  # miniupnpc raises plain Exception with the UPnP error text
        raise PortMapError(f"the UPnP router did not cooperate: {exc}") from None
    if not external_ip:
        raise PortMapError("the UPnP router does not know its external address")
    host, port = split_address(listen)
    lan = host if host not in ("", "0.0.0.0", "::") else upnp.lanaddr
    lease = LEASE
    try:
        upnp.addportmapping(port, "TCP", lan, port, DESCRIPTION, "", lease)
        external_port = port
    except Exception as first:
        try:  # the port is taken on the router (IGDv2 picks another), or leases unsupported
            external_port = int(
                upnp.addanyportmapping(port, "TCP", lan, port, DESCRIPTION, "", lease)
            )
        except Exception:
            try:
                lease = 0
                upnp.addportmapping(port, "TCP", lan, port, DESCRIPTION, "", lease)
                external_port = port
            except Exception:
                raise PortMapError(f"the UPnP router refused the mapping: {first}") from None
    mapping = PortMapping(
        external=join_address(external_ip, external_port),
        internal=join_address(lan, port),
        lease=lease,
        router=str(getattr(upnp, "urlbase", "") or ""),
    )
    return upnp, mapping


def _unmap(upnp: Any, mapping: PortMapping) -> None:
    _host, port = split_address(mapping.external)
    upnp.deleteportmapping(port, "TCP")


@attrs.define(eq=False)
class PortMapper:
    """Keeps one mapping alive for a listening address: :meth:`start`, :meth:`close`."""

    listen: str
    mapping: PortMapping | None = attrs.field(default=None, init=False)
    _upnp: Any = attrs.field(default=None, init=False, repr=False)
    _renewer: gevent.Greenlet | None = attrs.field(default=None, init=False, repr=False)

    def start(self) -> PortMapping:
        """Map the port (one line says so) and renew it in the background; PortMapError."""
        pool = gevent.get_hub().threadpool
        self._upnp, self.mapping = pool.apply(_map, (self.listen,))
        lease = f"lease {self.mapping.lease} s" if self.mapping.lease else "permanent"
        log.info(
            "UPnP: the router forwards %s to %s (%s)",
            self.mapping.external,
            self.mapping.internal,
            lease,
        )
        if self.mapping.lease:
            self._renewer = gevent.spawn(self._renew_loop)
        return self.mapping

    def _renew_loop(self) -> None:
        assert self.mapping is not None
        while True:
            gevent.sleep(self.mapping.lease / 2)
            try:
                _upnp, mapping = gevent.get_hub().threadpool.apply(_map, (self.listen,))
            except PortMapError as exc:
                log.warning("UPnP: renewing the port mapping failed: %s", exc)
                continue
            if mapping.external != self.mapping.external:
                log.warning(
                    "UPnP: the router now forwards %s (was %s)", mapping.external,
                    self.mapping.external,
                )  # fmt: skip
            self.mapping = mapping

    def close(self) -> None:
        """Stop renewing and remove the mapping (best effort: the lease ends it anyway)."""
        if self._renewer is not None:
            self._renewer.kill(block=False)
            self._renewer = None
        if self._upnp is not None and self.mapping is not None:
            try:
                gevent.get_hub().threadpool.apply(_unmap, (self._upnp, self.mapping))
            except Exception as exc:
                log.info("UPnP: removing the port mapping failed: %s", exc)
            self._upnp = None
