"""How many bytes of requests to keep in flight on one connection: pure logic.

A circuit's rate is bytes in flight / round-trip time, so a fixed request
pipeline is either too small for a long, fast path or a bloated queue on a
short one. :class:`FlowControl` sizes it the way BBR sizes a congestion
window, from two measurements taken on the requests themselves:

* **delivery rate**: for each block, the bytes delivered between the
  delivery just before its request went out and its own arrival, over that
  time (BBR's rate sample: robust to pipelining, blind to idle periods);
  the estimate is the maximum over the last :data:`BW_WINDOW_RTTS` round
  trips (at least :data:`BW_WINDOW_MIN` s), so it follows a drop within a
  few seconds;
* **minimum RTT**: request sent to block received, the minimum over
  :data:`MIN_RTT_WINDOW` seconds. When it has not been seen again for that
  long (the path got slower, or our own queue hides the floor), the window
  drops to half the bandwidth-delay product (shrinking with what the probe
  sees) until a request sent with well under rate x RTT ahead of it has come
  back (*probe RTT*): its RTT is the floor afresh (a rise is taken in steps of
  at most :data:`MIN_RTT_RISE`: other connections' queues at a shared
  bottleneck can survive our probe, and a circuit's path does not change),
  at the cost of about half a round trip of throughput every 10 s. The
  connections of one session probe together (:class:`RttProbes`): at an
  uplink they share, one connection's probe drains only its own queue, and a
  circuit that opened behind the others' queue would take it for its floor.

The window starts at :data:`INITIAL_WINDOW`. In *startup* it is
``rate x min RTT x`` :data:`STARTUP_GAIN`, so it about doubles every round
trip; once a round trip shows a queue (:data:`STARTUP_EXIT_RTT`,
:data:`STARTUP_EXIT_QUEUE`) or the rate has not grown by :data:`PLATEAU_GROWTH`
for :data:`PLATEAU_ROUNDS` round trips the pipe is full and the window backs off
to *cruise*: ``rate x min RTT`` plus a fixed :data:`QUEUE_TARGET` plus one
request batch (requests go out in batches, :meth:`FlowControl.wanted`, so
the average in flight is half a batch under the window), never under
:data:`CRUISE_FLOOR`. The fixed allowance is
what makes several connections through one bottleneck fair (each keeps the
same few hundred KiB queued there, so each sees the same RTT and gets the
same rate) and keeps the queue small whatever the BDP, so the minimum RTT
stays visible; it is also the slack through which a faster path shows up as
a higher delivery rate (the window probes up by itself). No fixed ceiling:
:data:`MAX_WINDOW` only mirrors what a peer accepts queued
(``session.MAX_PEER_REQUESTS``).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable

import attrs

BLOCK = 16 * 1024
#: Bytes in flight before anything is measured (BitTorrent's usual 32 requests).
INITIAL_WINDOW = 32 * BLOCK
#: The least a window ever is (while probing the RTT of a slow path).
MIN_WINDOW = 4 * BLOCK
#: The ceiling a peer itself imposes (2,000 queued requests, as libtorrent).
MAX_WINDOW = 2000 * BLOCK
#: Window = rate x min RTT x gain: 2/ln 2 (BBR's startup) while filling the pipe.
STARTUP_GAIN = 2 / math.log(2)
#: Bytes each connection keeps queued at the bottleneck once the pipe is full.
QUEUE_TARGET = 16 * BLOCK
#: The cruise window never falls below BitTorrent's usual 32 requests. Over a
#: busy CPU the RTT jitters far above its minimum; a window of rate x min RTT
#: plus the allowance then runs dry between late wake-ups, the rate it
#: measures falls, and the window with it (per circuit about allowance /
#: jitter): measured 0.2-0.7 MB/s per circuit with a load of 16 on 2 cores.
CRUISE_FLOOR = INITIAL_WINDOW
#: Requests go out in batches of a quarter of the window, at most this many bytes
#: (over a circuit every write costs a cell, short but with a layer at every hop and
#: the AEAD: one request per block received would send a cell up per block down).
MAX_BATCH = 64 * BLOCK
#: The pipe is full when the rate grew less than this in PLATEAU_ROUNDS rounds.
PLATEAU_GROWTH = 1.25
PLATEAU_ROUNDS = 3
#: Startup also ends after a round trip whose fastest request took this x the
#: minimum RTT, or that kept more than STARTUP_EXIT_QUEUE bytes queued
#: (window x (1 - min RTT / that RTT), Vegas' estimate): the pipe is full. With
#: several circuits through one uplink, each one's rate jumps as the others'
#: shares shift, so the plateau alone never showed, and the windows grew to
#: seconds of the uplink (measured: 15 MB in flight, RTTs of 1-2.6 s on paths
#: of 0.12-0.2 s, at 100 Mbit/s x 20 ms).
STARTUP_EXIT_RTT = 1.25
STARTUP_EXIT_QUEUE = 4 * QUEUE_TARGET
#: ... checked as soon as a round trip has this many RTT samples (HyStart++'s 8):
#: a round stretches with the queue, and startup grows the window x2.9 per round.
STARTUP_EXIT_SAMPLES = 8
#: The rate estimate is the best sample of the last BW_WINDOW_RTTS minimum
#: round trips, and of at least BW_WINDOW_MIN seconds. Time, not counted
#: rounds: a round stretches with the queue when the rate drops.
BW_WINDOW_RTTS = 3
BW_WINDOW_MIN = 2.0
#: Seconds a minimum RTT stays valid without being seen again.
MIN_RTT_WINDOW = 10.0
#: The window while probing the RTT, as a fraction of the BDP.
PROBE_RTT_GAIN = 0.5
#: Seconds a joint probe lasts at least, so that the connections it drains
#: are all drained at once (BBR's 200 ms).
PROBE_RTT_TIME = 0.2
#: A probe raises the minimum RTT by at most this factor.
MIN_RTT_RISE = 1.5
#: A probe ends with a request sent with less than this x rate x RTT outstanding.
PROBE_RTT_EXIT = 0.75
#: Requests remembered for rate samples (bounds memory against a peer that never answers).
MAX_TRACKED = 4096
#: A request unanswered for this many times its expected time is late: its peer
#: slowed down or stalled (:meth:`FlowControl.time_left`; the endgame copies it).
LATE_FACTOR = 2.0


@attrs.define
class _Sent:
    at: float
    delivered: int
    delivered_at: float
    #: Bytes outstanding when it was sent.
    in_flight: int


@attrs.define
class RttProbes:
    """When the connections of one session last began a probe of their RTT.

    They probe together: at a bottleneck they share (several circuits from one
    source), one connection's probe leaves the others' queues in place, so it
    sees them as its floor, and a circuit that joined behind them never sees
    anything else; draining all at once shows each one its own path.
    """

    started: float = -math.inf


class FlowControl:
    """One connection's bytes-in-flight target (:attr:`window`), fed by its requests."""

    def __init__(self, now: float, probes: RttProbes | None = None) -> None:
        self._probes = probes if probes is not None else RttProbes()
        self.window = INITIAL_WINDOW
        self.startup = True
        self.probing_rtt = False
        #: The most bytes requested and not yet received at one time (reported).
        self.peak_in_flight = 0
        self.rate = 0.0  # bytes/s, the windowed maximum
        self.min_rtt = math.inf
        self._min_rtt_at = now
        self._probe_started = now
        self._probe_rtt = math.inf
        self._delivered = 0
        self._delivered_at = now
        self._round = 0
        self._next_round_delivered = 0
        self._full_rate = 0.0
        self._flat_rounds = 0
        self._round_min_rtt = math.inf
        self._round_samples = 0
        self._samples: deque[tuple[float, float]] = deque()  # (time, rate), rates decreasing
        self._sent: OrderedDict[Hashable, _Sent] = OrderedDict()

    def on_request(self, key: Hashable, now: float, in_flight: int) -> None:
        """A request went out; ``in_flight`` counts the bytes outstanding before it."""
        if in_flight == 0:
            self._delivered_at = now  # an idle pipe is not slow delivery
        self._sent[key] = _Sent(now, self._delivered, self._delivered_at, in_flight)
        if len(self._sent) > MAX_TRACKED:
            self._sent.popitem(last=False)

    def on_requested(self, in_flight: int) -> None:
        """The bytes outstanding after a batch of requests (for the reported peak)."""
        self.peak_in_flight = max(self.peak_in_flight, in_flight)

    def forget(self, key: Hashable) -> None:
        """A request was cancelled or handed to another connection."""
        self._sent.pop(key, None)

    def on_block(self, key: Hashable, nbytes: int, now: float) -> None:
        """The block answering request ``key`` arrived."""
        self._delivered += nbytes
        self._delivered_at = now
        sent = self._sent.pop(key, None)
        if sent is None:
            return
        rtt = now - sent.at
        if sent.delivered >= self._next_round_delivered:
            self._next_round_delivered = self._delivered
            self._round += 1
            self._end_round(now)
        self._round_min_rtt = min(self._round_min_rtt, rtt)
        self._round_samples += 1
        if (
            self.startup
            and self._round_samples >= STARTUP_EXIT_SAMPLES
            and self._queue_shows(self._round_min_rtt)
        ):
            self.startup = False  # no need to wait for the round's end (HyStart++)
        if self.probing_rtt:
            if sent.at >= self._probe_started:
                self._probe_rtt = min(self._probe_rtt, rtt)
                if (
                    sent.in_flight <= self.rate * rtt * PROBE_RTT_EXIT
                    and now >= self._probes.started + PROBE_RTT_TIME
                ):
                    # Sent with clearly less than rate x RTT ahead of it, so no
                    # queue of ours: its RTT is the floor now (else shrink and
                    # retry). It may still hold other circuits' queues, and a
                    # circuit's path does not change: it rises by steps.
                    self.probing_rtt = False
                    self.min_rtt = min(self._probe_rtt, self.min_rtt * MIN_RTT_RISE)
                    self._min_rtt_at = now
        elif rtt <= self.min_rtt:
            self.min_rtt, self._min_rtt_at = rtt, now
        elif now - self._min_rtt_at > MIN_RTT_WINDOW:
            self._start_probe(now)
            if now - self._probes.started > MIN_RTT_WINDOW / 2:
                self._probes.started = now  # (else join the one under way)
        elif self._probes.started > self._probe_started and not self.startup:
            self._start_probe(now)  # another connection's probe: drain together
        interval = now - sent.delivered_at
        if interval > 0 and interval >= 0.5 * self.min_rtt:
            self._add_rate((self._delivered - sent.delivered) / interval, now)
        self._update_window()

    def _queue_shows(self, round_min_rtt: float) -> bool:
        """Whether even the fastest request of this round trip waited in a queue."""
        return math.isfinite(round_min_rtt) and (
            round_min_rtt > self.min_rtt * STARTUP_EXIT_RTT
            or self.window * (1 - self.min_rtt / round_min_rtt) > STARTUP_EXIT_QUEUE
        )

    def _start_probe(self, now: float) -> None:
        self.probing_rtt = True
        self._probe_started = now
        self._probe_rtt = math.inf

    def _add_rate(self, rate: float, now: float) -> None:
        samples = self._samples
        while samples and samples[-1][1] <= rate:
            samples.pop()
        samples.append((now, rate))
        self._expire_rates(now)

    def _expire_rates(self, now: float) -> None:
        samples = self._samples
        horizon = max(BW_WINDOW_MIN, BW_WINDOW_RTTS * self.min_rtt)
        while len(samples) > 1 and samples[0][0] < now - horizon:
            samples.popleft()
        if samples:
            self.rate = samples[0][1]

    def _end_round(self, now: float) -> None:
        self._expire_rates(now)
        round_min_rtt, self._round_min_rtt = self._round_min_rtt, math.inf
        self._round_samples = 0
        if not self.startup:
            return
        if self._queue_shows(round_min_rtt):
            self.startup = False
            return
        if self.rate >= self._full_rate * PLATEAU_GROWTH:
            self._full_rate = self.rate
            self._flat_rounds = 0
        else:
            self._flat_rounds += 1
            if self._flat_rounds >= PLATEAU_ROUNDS:
                self.startup = False

    def _update_window(self) -> None:
        if self.probing_rtt:
            # Half the BDP: the bottleneck queue empties while the pipe stays half full.
            rtt = (
                min(self._probe_rtt, self.min_rtt)
                if math.isfinite(self._probe_rtt)
                else (self.min_rtt)
            )
            self.window = max(MIN_WINDOW, int(self.rate * rtt * PROBE_RTT_GAIN))
            return
        if not self.rate or not math.isfinite(self.min_rtt):
            return
        bdp = self.rate * self.min_rtt
        if self.startup:
            target = max(int(bdp * STARTUP_GAIN), self.window)  # startup only grows
        else:
            target = max(CRUISE_FLOOR, int(bdp) + QUEUE_TARGET + _batch(int(bdp)))
        self.window = max(MIN_WINDOW, min(MAX_WINDOW, target))

    def delivery_time(self, in_flight: int) -> float:
        """Seconds until a request sent now, behind ``in_flight`` bytes, is answered
        (infinite until a rate and an RTT are measured)."""
        if not self.rate or not math.isfinite(self.min_rtt):
            return math.inf
        return self.min_rtt + in_flight / self.rate

    def time_left(self, key: Hashable, now: float) -> float:
        """Seconds until the block of request ``key`` should arrive, from when it was sent
        and what was ahead of it; infinite when nothing is measured, the request is not
        tracked, or it has taken :data:`LATE_FACTOR` times as long as it should (the peer
        slowed down or stalled); 0 while it is late by less than that (jitter)."""
        sent = self._sent.get(key)
        expected = math.inf if sent is None else self.delivery_time(sent.in_flight)
        if sent is None or not math.isfinite(expected):
            return math.inf
        waited = now - sent.at
        if waited > LATE_FACTOR * expected:
            return math.inf
        return max(0.0, expected - waited)

    def bytes_ahead(self, key: Hashable) -> int | None:
        """Bytes still to arrive before the block of request ``key`` completes (what was
        outstanding when it was sent, less what came since), or None if not tracked."""
        sent = self._sent.get(key)
        if sent is None:
            return None
        return max(0, sent.in_flight - (self._delivered - sent.delivered)) + BLOCK

    def describe(self) -> str:
        """One line for the logs: what the controller measured and chose."""
        return (
            f"flow window {self.window // 1024} KiB (peak in flight "
            f"{self.peak_in_flight // 1024} KiB), delivery rate {self.rate / 1e6:.2f} MB/s, "
            f"min RTT {self.min_rtt * 1000:.0f} ms, {'startup' if self.startup else 'cruise'}"
        )

    def wanted(self, in_flight: int) -> int:
        """Bytes to request now with ``in_flight`` outstanding: a whole batch or nothing."""
        room = self.window - in_flight
        if room <= 0 or (in_flight and room < _batch(self.window)):
            return 0
        return room


def _batch(window: int) -> int:
    return max(BLOCK, min(MAX_BATCH, window // 4 // BLOCK * BLOCK))
