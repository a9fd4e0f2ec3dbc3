"""How fast can one network list a tracker's members? Issue 11's attack, measured.

The attacker joins a throwaway identity whenever the tracker lets its network
and counts the distinct addresses the replies name. Two strategies: ``stay``
keeps every identity and has it announce as often as pays, reporting two of
its neighbours ``unreachable`` each time (each replaced edge names a new
peer); ``leave`` has each identity leave (a ``stopped`` announce) right after
its first reply, so that the next one is not given the last one's free slots
but splits edges picked at random across the network. It talks HTTPS to a real
tracker in this process whose clock is simulated, so an hour of attack takes
about a minute. The honest peers are registered directly and never expire
(an interval of an hour), and the per-IP HTTP limit is lifted: the attack needs
about 2,500 requests an hour, far below its 36,000.

Run: ``python -m anomos.bench.enumeration [--peers 1000] [--hours 1]``
(figures in docs/threat-model.md).
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

from anomos.errors import TrackerError
from anomos.identity import PeerIdentity, x25519_public
from anomos.pluginmanager import Plugins
from anomos.tracker.client import LostNeighbour, Neighbour, TrackerClient
from anomos.tracker.limits import LimitSettings
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

#: Simulated seconds between the attacker's moves (the tracker's min_interval).
STEP = 5.0
#: Simulated seconds between two announces of one attacking identity (its
#: replacement allowance refills one per 300 s, and it holds up to 4).
ANNOUNCE_EVERY = 150.0


class _Clock:
    """The tracker's clock, moved by the attack, and the time the client stamps."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class _Client(TrackerClient):
    """A client that stamps its requests with the simulated clock."""

    clock: _Clock

    def _post(self, path: str, inner: dict[str, Any]) -> dict[bytes, Any]:
        try:
            return super()._post(path, {**inner, "time": int(self.clock())})
        finally:
            self.close()  # an attacker holds no idle connection: it would take a join's slot


def _register(tracker: Tracker, n: int) -> dict[bytes, str]:
    keys = x25519_public(secrets.token_bytes(32))
    members = {}
    for i in range(n):
        pub = secrets.token_bytes(32)
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7000"
        inner = {
            b"time": int(tracker.clock()),
            b"session": b"s",
            b"onion": keys,
            b"box": keys,
            b"address": address.encode(),
            b"relayed": 0,
            b"stopped": 0,
            b"torrents": [],
        }
        tracker.announce(pub, inner)
        members[pub] = address
    return members


def enumerate_membership(
    plugins: Plugins,
    *,
    peers: int = 1000,
    hours: float = 1.0,
    hosts: int = 1,
    strategy: str = "stay",
    limits: LimitSettings | None = None,
) -> dict[str, Any]:
    """Run the attack for ``hours`` simulated hours from ``hosts`` addresses of one
    /24; what it learned."""
    clock = _Clock(1.8e9)
    with tempfile.TemporaryDirectory(prefix="anomos-enum-") as state:
        tracker = Tracker(
            Path(state),
            "127.0.0.1:0",
            plugins,
            TrackerSettings(
                interval=3600, rate=1e9, burst=1e9, edge_settle=0, limits=limits or LimitSettings()
            ),
            clock=clock,
        )
        members = _register(tracker, peers)
        tracker.start()
        try:
            return _attack(tracker, clock, members, hours, hosts, strategy)
        finally:
            tracker.stop()


def _attack(
    tracker: Tracker,
    clock: _Clock,
    members: dict[bytes, str],
    hours: float,
    hosts: int,
    strategy: str,
) -> dict[str, Any]:
    net = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}"
    addresses = set(members.values())
    learned: set[str] = set()
    spies: list[tuple[_Client, str, list[Neighbour], list[float]]] = []
    joins = refused = requests = 0
    timeline = []
    end = clock.now + hours * 3600
    while clock.now < end:
        clock.now += STEP
        host = f"{net}.{2 + joins % hosts}"
        spy = _Client(tracker.url, tracker.fingerprint, PeerIdentity.generate(), source_host=host)
        spy.clock = clock
        requests += 1
        try:
            reply = spy.announce(f"{host}:7000", [], 0)
        except TrackerError:
            refused += 1
        else:
            joins += 1
            learned |= {n.address for n in reply.neighbours}
            if strategy == "leave":
                requests += 1
                spy.announce(f"{host}:7000", [], 0, stopped=True)
            else:
                spies.append((spy, host, list(reply.neighbours), [clock.now]))
        for spy, host, neighbours, last in spies:
            if clock.now - last[0] < ANNOUNCE_EVERY:
                continue
            last[0] = clock.now
            # Its fellow spies first: an edge between two of them names no one new.
            ranked = sorted(neighbours, key=lambda n: not n.address.startswith(net))
            lost = [LostNeighbour(n.nid, 0, "unreachable") for n in ranked[:2]]
            requests += 1
            try:
                reply = spy.announce(f"{host}:7000", [], 0, lost=lost)
            except TrackerError:
                continue
            neighbours[:] = reply.neighbours
            learned |= {n.address for n in reply.neighbours}
        if int(clock.now) % 600 == 0:
            timeline.append((int(clock.now - end + hours * 3600), len(learned & addresses)))
    honest = len(learned & addresses)
    return {
        "peers": len(members),
        "hours": hours,
        "hosts": hosts,
        "strategy": strategy,
        "identities_joined": joins,
        "joins_refused": refused,
        "requests": requests,
        "addresses_learned": honest,
        "learned_per_hour": honest / hours,
        "timeline": timeline,
    }


def main(argv: list[str] | None = None) -> None:
    from anomos.pluginmanager import get_plugins

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--hosts", type=int, default=1, help="attacking addresses in one /24")
    parser.add_argument("--strategy", choices=("stay", "leave"), default="stay")
    parser.add_argument("--unlimited", action="store_true", help="lift the limits (as before)")
    args = parser.parse_args(argv)
    result = enumerate_membership(
        get_plugins(),
        peers=args.peers,
        hours=args.hours,
        hosts=args.hosts,
        strategy=args.strategy,
        limits=LimitSettings.unlimited() if args.unlimited else None,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
