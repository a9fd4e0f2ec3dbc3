"""Whether a peer can be dialled from outside, as the tracker finds out by dialling it.

Most home peers sit behind NAT or a firewall: they can dial out but nobody can
dial in. The tracker checks each peer that announces: it connects back to the
address the peer advertises and does the link's TLS hello, which only that
peer can answer (its certificate carries the identity it announced with). The
verdict steers planning (:class:`anomos.tracker.graph.PeerGraph` consults
:attr:`Reachability.closed`): a peer that cannot be dialled dials every edge
itself, and two such peers are never made neighbours.

Probing on behalf of strangers makes the tracker a port scanner unless it is
bounded, so:

* the tracker only ever dials **the address the announce came from**: a peer
  advertising another host (a private address behind NAT, a host name,
  another machine) is not dialled at all and is taken as unreachable;
* only the link hello is sent (a TLS 1.3 ClientHello), and the connection is
  closed after the server's certificate, within :data:`PROBE_TIMEOUT`;
* at most :data:`MAX_IN_FLIGHT` probes at once, at most one per identity per
  :data:`PROBE_EVERY` seconds, and per source network a bucket of
  :data:`NETWORK_BURST` then one per :data:`NETWORK_EVERY` seconds; a probe
  that does not fit is not queued (nothing grows), it is tried again at the
  peer's next announce;
* probes run in their own greenlets, never on the request path.

Onion addresses are not probed: Tor's rendezvous crosses NAT, so an onion
service is reachable by construction (a peer lying about its onion is caught
by its neighbours' ``unreachable`` reports, as any other). Announces that
come through an address shared by many clients (tor's end of the tracker's
own onion service) cannot be told apart by source, so they are not probed
either: such peers are planned as before, as if reachable.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import Callable, Hashable

import attrs
import gevent

from anomos.config import is_onion, split_address
from anomos.errors import ConfigError
from anomos.tracker.limits import KeyedBuckets

log = logging.getLogger(__name__)

#: Seconds a probe may take in all: TCP connect, TLS hello, the peer's certificate.
PROBE_TIMEOUT = 5.0
#: Probes running at once; more are not started (tried again at a later announce).
MAX_IN_FLIGHT = 32
#: Seconds between two probes of one identity, whatever it announces meanwhile.
PROBE_EVERY = 30.0
#: Probes one source network (an IPv4 /24, an IPv6 /64) may cause back to back ...
NETWORK_BURST = 16.0
#: ... and then one per this many seconds.
NETWORK_EVERY = 5.0
#: Seconds a verdict holds before the peer is probed again at its next announce
#: (a reachable peer's router may have forgotten its mapping; an unreachable
#: one may have opened its port).
RECHECK_REACHABLE = 1800.0
RECHECK_UNREACHABLE = 300.0
#: Why a peer is taken as unreachable without a probe.
ADVERTISES_ANOTHER_HOST = "advertises another host than the one its announces come from"

Peer = Hashable


class Reach(enum.Enum):
    """What the tracker knows about dialling a peer from outside."""

    #: Not probed and not to be (probing off, an onion address, a shared client
    #: address): planned as reachable, as every peer was before probing.
    UNCHECKED = "unchecked"
    #: A probe is due or under way: planned as unreachable until it answers.
    CHECKING = "checking"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


#: ``probe(address, identity, timeout)``: None when the peer answered as itself, else why not.
Probe = Callable[[str, bytes, float], "str | None"]
#: ``on_verdict(peer, before, after)``: a peer's state changed (the graph may need mending).
OnVerdict = Callable[[Peer, Reach, Reach], None]


def probe_link(address: str, identity: bytes, timeout: float) -> str | None:
    """Dial ``address`` and do the link's TLS hello; None if the certificate is ``identity``'s."""
    from anomos.net.link import TLSStream, certificate_identity, client_context

    host, port = split_address(address)
    sock = None
    try:
        with gevent.Timeout(timeout, TimeoutError(f"no TLS hello within {timeout:g} s")):
            raw = socket.create_connection((host, port), timeout=timeout)
            sock = TLSStream(raw, client_context(), server_side=False)
            sock.do_handshake()
            if certificate_identity(sock.getpeercert(binary_form=True)) != identity:
                return "something else answers there"
    except (OSError, TimeoutError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


@attrs.define(eq=False)
class _Record:
    """One peer's verdict (slotted: a tracker may keep a million of these)."""

    #: hash of the address the verdict is for (a change means probing again)
    address: int
    state: Reach
    #: when the state was decided, and when the peer was last probed (tracker clock)
    at: float
    probed_at: float = -PROBE_EVERY
    reason: str = ""
    #: bumped at every new probe: a probe's answer counts only if it is still the latest
    generation: int = 0


class Reachability:
    """The tracker's verdicts on its peers, and the bounded probing behind them.

    :attr:`closed` is the set the graph consults: peers that are unreachable
    or not yet known to be reachable.
    """

    def __init__(
        self,
        *,
        probe: Probe = probe_link,
        on_verdict: OnVerdict | None = None,
        network_of: Callable[[str], str] = str,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = PROBE_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1 or timeout <= 0:
            raise ConfigError("reachability probes need a positive timeout and in-flight cap")
        self.probe = probe
        self.on_verdict = on_verdict
        self.network_of = network_of
        self.clock = clock
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        #: Peers planned as unreachable (CHECKING or UNREACHABLE).
        self.closed: set[Peer] = set()
        self._records: dict[Peer, _Record] = {}
        self._networks = KeyedBuckets(1.0 / NETWORK_EVERY, NETWORK_BURST, clock)
        self._in_flight: dict[Peer, gevent.Greenlet] = {}
        #: probes started, and those not started for the bounds (for tests and /stats)
        self.started = 0
        self.skipped = 0

    # ------------------------------------------------------------------ queries
    def state(self, peer: Peer) -> Reach:
        record = self._records.get(peer)
        return Reach.UNCHECKED if record is None else record.state

    def reason(self, peer: Peer) -> str:
        record = self._records.get(peer)
        return "" if record is None else record.reason

    def counts(self) -> dict[str, int]:
        """Peers in each probed state (the unchecked ones are not kept)."""
        out = dict.fromkeys((r.value for r in Reach if r is not Reach.UNCHECKED), 0)
        for record in self._records.values():
            if record.state is not Reach.UNCHECKED:
                out[record.state.value] += 1
        return out

    # ------------------------------------------------------------------ updates
    def announced(
        self, peer: Peer, identity: bytes, address: str, client: str | None, shared: bool
    ) -> Reach:
        """``peer`` announced ``address`` from ``client`` (None: not over the network;
        ``shared``: an address many clients share); probe it if due. Its state now."""
        if client is None or shared or is_onion(address):
            self._set(peer, address, Reach.UNCHECKED, "")
            return Reach.UNCHECKED
        host, _port = split_address(address)
        advertised, source = _ip(host), _ip(client)
        if advertised is None or advertised != source:
            # Dialling anything but where it came from would let any peer aim the
            # tracker at any host; a peer behind NAT advertises its private address.
            why = ADVERTISES_ANOTHER_HOST
            self._set(peer, address, Reach.UNREACHABLE, why)
            return Reach.UNREACHABLE
        record = self._records.get(peer)
        now = self.clock()
        if record is not None and record.address == hash(address):
            if record.state is Reach.CHECKING and peer in self._in_flight:
                return record.state
            recheck = RECHECK_REACHABLE if record.state is Reach.REACHABLE else RECHECK_UNREACHABLE
            if record.state is not Reach.CHECKING and now - record.at < recheck:
                return record.state
            # Due again: the old verdict holds until the new one comes.
        else:
            self._set(peer, address, Reach.CHECKING, "")
        self._start(peer, identity, address, client)
        return self.state(peer)

    def forget(self, peer: Peer) -> None:
        """``peer`` left: drop its verdict (a probe under way is ignored when it ends)."""
        self._records.pop(peer, None)
        self.closed.discard(peer)
        g = self._in_flight.pop(peer, None)
        if g is not None:
            g.kill(block=False)

    def close(self) -> None:
        gevent.killall(list(self._in_flight.values()), block=False)
        self._in_flight.clear()

    # ------------------------------------------------------------------ internals
    def _start(self, peer: Peer, identity: bytes, address: str, client: str) -> None:
        now = self.clock()
        if (
            peer in self._in_flight
            or len(self._in_flight) >= self.max_in_flight
            or now - self._records[peer].probed_at < PROBE_EVERY
            or not self._networks.try_take(self.network_of(client))
        ):
            self.skipped += 1
            return
        record = self._records[peer]
        record.probed_at = now
        record.generation += 1
        self.started += 1
        self._in_flight[peer] = gevent.spawn(self._run, peer, identity, address, record.generation)

    def _run(self, peer: Peer, identity: bytes, address: str, generation: int) -> None:
        try:
            why = self.probe(address, identity, self.timeout)
        except Exception as exc:  # a probe must never take the tracker down
            log.exception("reachability probe of %s failed", address)
            why = f"probe failed: {exc}"
        finally:
            if self._in_flight.get(peer) is gevent.getcurrent():
                del self._in_flight[peer]
        record = self._records.get(peer)
        if record is None or record.generation != generation or record.address != hash(address):
            return  # it left, moved or was probed again meanwhile
        state = Reach.REACHABLE if why is None else Reach.UNREACHABLE
        log.debug("peer at %s is %s%s", address, state.value, f" ({why})" if why else "")
        self._set(peer, address, state, sys.intern(why or ""))

    def _set(self, peer: Peer, address: str, state: Reach, reason: str) -> None:
        record = self._records.get(peer)
        before = Reach.UNCHECKED if record is None else record.state
        now = self.clock()
        if state is Reach.UNCHECKED and (record is None or now - record.probed_at >= PROBE_EVERY):
            self._records.pop(peer, None)  # the default: nothing to keep
        elif record is None:
            self._records[peer] = _Record(hash(address), state, now, reason=reason)
        else:  # (an unchecked record is kept while it bounds the next probe)
            record.address, record.state, record.at, record.reason = (
                hash(address),
                state,
                now,
                reason,
            )
        if state in (Reach.CHECKING, Reach.UNREACHABLE):
            self.closed.add(peer)
        else:
            self.closed.discard(peer)
        if before is not state and self.on_verdict is not None:
            self.on_verdict(peer, before, state)
