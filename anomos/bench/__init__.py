"""``anomos bench``: how fast anomos moves data, builds circuits and serves a tracker.

Every figure is measured on real processes on loopback (``node`` workers, one
per peer) or, for the tracker, in one process on one core; see
docs/performance.md for what each figure means and what limits it.

Modules: :mod:`~anomos.bench.node` (the worker peer), :mod:`~anomos.bench.procs`
(starting and talking to workers), :mod:`~anomos.bench.tcpcopy` (the plain
TCP baseline), :mod:`~anomos.bench.network` (throughput, set-up latency,
memory), :mod:`~anomos.bench.tracker` (tracker figures),
:mod:`~anomos.bench.report` (statistics and the table), and
:mod:`~anomos.bench.runner` (everything together).
"""
