"""FlowControl over a simulated clock: bytes in flight follow rate x RTT.

The simulated path is a source that serves requests one block at a time at a
fixed rate (its uplink), behind a one-way delay each way; the downloader keeps
``window`` bytes of requests outstanding, as TorrentSession does.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import attrs

from anomos.torrent import flow
from anomos.torrent.flow import BLOCK, FlowControl, RttProbes


@attrs.define
class Path:
    rate: float  # bytes/s the source sends
    rtt: float  # seconds, both ways together


@attrs.define
class Downloader:
    """One connection: its controller, its outstanding requests and what arrived."""

    flow: FlowControl
    path: Path
    in_flight: int = 0
    next_key: int = 0
    arrivals: list[tuple[float, int]] = attrs.field(factory=list)
    peak_queue_delay: float = 0.0

    def rate_between(self, t0: float, t1: float) -> float:
        return sum(n for t, n in self.arrivals if t0 <= t < t1) / (t1 - t0)


class Sim:
    """Event loop: requests travel, a FIFO source serves them, blocks travel back."""

    def __init__(self, downloaders: list[Downloader], source_rate: Callable[[float], float]):
        self.now = 0.0
        self.events: list[tuple[float, int, Downloader, int]] = []
        self.seq = 0
        self.busy_until = 0.0
        self.downloaders = downloaders
        self.source_rate = source_rate

    def fill(self, d: Downloader) -> None:
        for _ in range(d.flow.wanted(d.in_flight) // BLOCK):
            key = d.next_key
            d.next_key += 1
            d.flow.on_request(key, self.now, d.in_flight)
            d.in_flight += BLOCK
            arrive_at_source = self.now + d.path.rtt / 2
            start = max(arrive_at_source, self.busy_until)
            d.peak_queue_delay = max(d.peak_queue_delay, start - arrive_at_source)
            self.busy_until = start + BLOCK / self.source_rate(start)
            self.seq += 1
            heapq.heappush(self.events, (self.busy_until + d.path.rtt / 2, self.seq, d, key))
        d.flow.on_requested(d.in_flight)

    def run_until(self, end: float) -> None:
        for d in self.downloaders:
            if d.in_flight == 0:
                self.fill(d)
        while self.events and self.events[0][0] <= end:
            self.now, _, d, key = heapq.heappop(self.events)
            d.in_flight -= BLOCK
            d.flow.on_block(key, BLOCK, self.now)
            d.arrivals.append((self.now, BLOCK))
            self.fill(d)
        self.now = end


def cruising(window: int, rate: float, rtt: float) -> bool:
    """Whether ``window`` is the cruise window for this path: its BDP, the queue
    allowance and a batch, within 15 %."""
    bdp = rate * rtt
    want = bdp + flow.QUEUE_TARGET + min(flow.MAX_BATCH, bdp / 4)
    return 0.85 * want <= window <= 1.15 * want


def cruise_window(sim: Sim, d: Downloader, until: float) -> int:
    """Run to ``until``; the window at the last moment it was not probing the RTT."""
    window = d.flow.window
    while sim.now < until:
        sim.run_until(min(until, sim.now + 0.05))
        if not d.flow.probing_rtt:
            window = d.flow.window
    return window


def one(rate: float, rtt: float) -> tuple[Sim, Downloader]:
    d = Downloader(FlowControl(0.0), Path(rate, rtt))
    return Sim([d], lambda _t: d.path.rate), d


def test_startup_grows_from_the_first_round_trip_then_backs_off_to_the_bdp() -> None:
    sim, d = one(rate=5e6, rtt=0.2)
    bdp = 5e6 * 0.2
    sim.run_until(0.2)
    assert d.flow.window == flow.INITIAL_WINDOW  # nothing measured yet
    windows = []
    for step in range(1, 9):
        sim.run_until(0.2 + step * 0.2)
        windows.append(d.flow.window)
    # Slow start: the window about doubles per round trip until it covers the BDP.
    assert windows[1] >= 1.8 * flow.INITIAL_WINDOW, windows
    assert max(windows) >= bdp, windows
    peak = max(max(windows), d.flow.window)
    sim.run_until(10.0)
    assert not d.flow.startup  # the rate stopped growing: the pipe is full
    assert d.flow.window < peak  # ... and the window backed off from startup
    assert cruising(d.flow.window, 5e6, 0.2), d.flow.window
    assert d.rate_between(5.0, 10.0) >= 0.97 * 5e6
    # Startup overshoots into the queue for a moment; cruising, it keeps a few
    # hundred KiB there, not a BDP.
    assert d.peak_queue_delay <= 2.0 * 0.2
    d.peak_queue_delay = 0.0
    sim.run_until(20.0)
    assert d.peak_queue_delay * 5e6 <= flow.QUEUE_TARGET + flow.MAX_BATCH


def test_window_follows_the_rtt_up_and_down() -> None:
    sim, d = one(rate=4e6, rtt=0.1)
    sim.run_until(8.0)
    assert cruising(d.flow.window, 4e6, 0.1), d.flow.window
    d.path.rtt = 0.4  # the path got longer: a few probes of the RTT find it
    window = cruise_window(sim, d, 8.0 + 4 * (flow.MIN_RTT_WINDOW + 1.0) + 6.0)
    assert cruising(window, 4e6, 0.4), window
    t = sim.now
    assert d.rate_between(t - 8.0, t) >= 0.9 * 4e6  # a probe of the RTT included
    d.path.rtt = 0.05  # shorter again: the next probe of the RTT finds the new floor
    window = cruise_window(sim, d, t + flow.MIN_RTT_WINDOW + 4.0)
    assert cruising(window, 4e6, 0.05), window
    assert d.rate_between(sim.now - 1.0, sim.now) >= 0.9 * 4e6


def test_window_follows_the_rate_down_and_probes_it_up() -> None:
    rate = {"now": 8e6}
    d = Downloader(FlowControl(0.0), Path(0, 0.2))
    sim = Sim([d], lambda _t: rate["now"])
    sim.run_until(8.0)
    assert cruising(d.flow.window, 8e6, 0.2), d.flow.window
    rate["now"] = 2e6
    sim.run_until(14.0)
    assert cruising(d.flow.window, 2e6, 0.2), d.flow.window
    rate["now"] = 6e6  # more room: the slack of the window finds it, no fixed cap
    sim.run_until(20.0)
    assert cruising(d.flow.window, 6e6, 0.2), d.flow.window
    assert d.rate_between(17.0, 20.0) >= 0.9 * 6e6


def test_connections_to_one_source_share_its_uplink() -> None:
    probes = RttProbes()  # one session's connections probe their RTT together
    a = Downloader(FlowControl(0.0, probes), Path(0, 0.2))
    b = Downloader(FlowControl(0.0, probes), Path(0, 0.2))
    sim = Sim([a], lambda _t: 6e6)
    sim.run_until(5.0)
    sim.downloaders.append(b)  # a second circuit to the same source joins late
    b.flow = FlowControl(5.0, probes)
    sim.run_until(40.0)
    ra, rb = a.rate_between(25.0, 40.0), b.rate_between(25.0, 40.0)
    assert ra + rb >= 0.95 * 6e6
    assert min(ra, rb) / max(ra, rb) >= 0.8, (ra, rb)


def test_circuits_of_different_lengths_share_a_source_without_ratcheting_their_rtt() -> None:
    # Four circuits to one source, 0.2-0.5 s long: each one's queue survives the
    # others' RTT probes, so a probe may see more than the floor.
    probes = RttProbes()
    ds = [Downloader(FlowControl(0.0, probes), Path(0, rtt)) for rtt in (0.2, 0.3, 0.4, 0.5)]
    sim = Sim(list(ds), lambda _t: 8e6)
    sim.run_until(90.0)
    rates = [d.rate_between(30.0, 90.0) for d in ds]
    assert sum(rates) >= 0.95 * 8e6
    assert min(rates) / max(rates) >= 0.35, rates
    for d in ds:  # the floor stays in sight: no ratchet from others' queues
        assert d.flow.min_rtt <= 2 * d.path.rtt, (d.path.rtt, d.flow.min_rtt)
        assert d.flow.window <= 4 * (8e6 / 4) * d.path.rtt + flow.QUEUE_TARGET + flow.MAX_BATCH


def test_requests_never_answered_are_not_remembered_forever() -> None:
    f = FlowControl(0.0)
    for key in range(flow.MAX_TRACKED * 3):
        f.on_request(key, 0.0, 0)
    assert len(f._sent) == flow.MAX_TRACKED


def test_circuits_opening_one_after_another_leave_startup_when_the_queue_shows() -> None:
    # The bench's shape: four circuits of 0.12-0.2 s to one source, opening over
    # 1.5 s. Each later one first sees the earlier ones' queue as its floor; its
    # startup must end once its own round trips queue (not on a rate plateau that
    # the others' shifting shares never show), and the joint probe of the RTT
    # must show every one its own floor.
    rate = 11.5e6
    probes = RttProbes()
    paths = [(0.0, 0.12), (0.25, 0.16), (1.25, 0.2), (1.5, 0.16)]
    ds = [Downloader(FlowControl(start, probes), Path(0, rtt)) for start, rtt in paths]
    sim = Sim([], lambda _t: rate)
    worst_queue = 0.0
    while sim.now < 24.0:
        for d, (start, _rtt) in zip(ds, paths, strict=True):
            if start <= sim.now and d not in sim.downloaders:
                sim.downloaders.append(d)
        sim.run_until(sim.now + 0.05)
        if sim.now >= 4.0:
            worst_queue = max(worst_queue, sim.busy_until - sim.now)
        if sim.now >= 4.0:
            assert not any(d.flow.startup for d in ds), [d.flow.window for d in ds]
    assert sum(d.rate_between(2.0, 24.0) for d in ds) >= 0.95 * rate
    # A queue of a few allowances, not seconds of the uplink (15 MB in flight before).
    assert worst_queue <= 0.5, worst_queue
    for d in ds:
        assert d.flow.min_rtt <= 2 * d.path.rtt, (d.path.rtt, d.flow.min_rtt)
