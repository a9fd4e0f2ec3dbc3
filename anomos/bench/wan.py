"""``anomos bench --wan``: anomos against a direct libtorrent download on an emulated WAN.

Every node (tracker, relays, seeder, downloader, and libtorrent's two) gets an
address 127.0.1.N in one network namespace of its own, and an emulated
access link: an HTB class on the namespace's loopback caps what the node
sends at the profile's rate (a byte FIFO of :data:`QUEUE_SECONDS` of that
rate is its modem buffer), and every packet it sends then waits the
profile's one-way delay in :mod:`anomos.bench.delayline` (the kernel has no
netem) before it is delivered; :meth:`WanNet.one_way` measures that delay
packet by packet. Two nodes thus see an RTT of twice the delay;
a circuit of R relays crosses R + 1 such links each way. The loopback MTU is
1500 so TCP grows its window in real segment sizes. :meth:`WanNet.verify`
measures the RTT (TCP connects) and the rate (a bulk TCP copy) against the
settings before anything is timed.

Needs root, iproute2 and iptables (NFQUEUE target); a C compiler for the C
delay line (else the pure-Python one runs, at twice its CPU, which the
processes under test then lack); python libtorrent for the comparison.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from anomos.bench.delayline import DelayLine, Implementation
from anomos.bench.wantrace import UplinkWatch, analyse, tcp_sockets
from anomos.errors import AnomosError

#: Seconds of the node's rate its uplink buffer holds (a modest modem buffer).
QUEUE_SECONDS = 0.05
#: TCP buffer ceiling for every socket in the namespace (both clients alike).
TCP_BUFFER_MAX = 32 * 1024 * 1024
SUBNET = "127.0.1"
#: TCP payload per frame the HTB counts: 1448 of 1514 bytes (MTU 1500, timestamps).
GOODPUT = 1448 / 1514
MiB = 1024 * 1024


@attrs.frozen
class Profile:
    """A per-node access link: uplink rate and one-way delay."""

    rate_bits: int
    delay: float

    @property
    def name(self) -> str:
        rate = (
            f"{self.rate_bits // 10**9} Gbit/s"
            if self.rate_bits >= 10**9
            else (f"{self.rate_bits // 10**6} Mbit/s")
        )
        return f"{rate} x {self.delay * 1000:g} ms"

    @classmethod
    def parse(cls, text: str) -> Profile:
        """``100M:20ms``, ``1G:50ms``."""
        try:
            rate, delay = text.lower().split(":")
            scale = {"k": 10**3, "m": 10**6, "g": 10**9}[rate[-1]]
            ms = float(delay.removesuffix("ms"))
            return cls(int(float(rate[:-1]) * scale), ms / 1000)
        except (ValueError, KeyError):
            raise AnomosError(
                f"WAN profile {text!r}: expected RATE:DELAY such as 100M:20ms"
            ) from None


PROFILES = (Profile(100 * 10**6, 0.020), Profile(100 * 10**6, 0.050), Profile(10**9, 0.050))


def unavailable() -> str | None:
    """Why the emulated WAN cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, iptables)"
    for tool in ("ip", "tc", "iptables-nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 iptables)"
    return None


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AnomosError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


@attrs.define(eq=False)
class WanNet:
    """One namespace of emulated nodes; use as a context manager."""

    profile: Profile
    ns: str = attrs.field(factory=lambda: f"anwan-{secrets.token_hex(4)}")
    nodes: list[str] = attrs.field(factory=list)
    #: Which delay line (None: the C one where a compiler exists, else Python).
    delay_line: Implementation | None = None
    _delay: DelayLine | None = None

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.ns]

    def start(self) -> WanNet:
        _run("ip", "netns", "add", self.ns)
        try:
            self._sh("ip", "link", "set", "lo", "up", "mtu", "1500")
            buffers = f"4096 131072 {TCP_BUFFER_MAX}"
            self._sh("sysctl", "-q", "-w", f"net.ipv4.tcp_rmem={buffers}")
            self._sh("sysctl", "-q", "-w", f"net.ipv4.tcp_wmem={buffers}")
            self._sh("sysctl", "-q", "-w", f"net.core.rmem_max={TCP_BUFFER_MAX}")
            self._sh("sysctl", "-q", "-w", f"net.core.wmem_max={TCP_BUFFER_MAX}")
            self._sh("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")
            # Delay on arrival: held packets then no longer count against the
            # sender's TCP small-queue budget, as on a real wire.
            self._sh(
                "iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-s", f"{SUBNET}.0/24",
                "-j", "NFQUEUE", "--queue-num", "0",
            )  # fmt: skip
            self._delay = DelayLine.start(self.prefix, self.profile.delay, self.delay_line)
        except BaseException:
            self.close()
            raise
        return self

    def _sh(self, *cmd: str) -> None:
        _run(*self.prefix, *cmd)

    def pids(self) -> dict[str, int]:
        """The emulation's own processes (the delay line), by name."""
        return {"delay line": self._delay.pid} if self._delay is not None else {}

    def add_node(self, rate_bits: int | None = None) -> str:
        """A new address with its own uplink (the profile's rate unless given)."""
        n = len(self.nodes) + 2
        address = f"{SUBNET}.{n}"
        rate = rate_bits or self.profile.rate_bits
        burst = str(max(64 * 1024, rate // 8 // 1000))  # at least 1 ms of the rate
        queue = str(max(256 * 1024, int(rate / 8 * QUEUE_SECONDS)))
        self._sh("ip", "addr", "add", f"{address}/32", "dev", "lo")
        self._sh(
            "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{n}", "htb",
            "rate", str(rate), "ceil", str(rate), "burst", burst, "cburst", burst,
            "quantum", "60000",
        )  # fmt: skip
        self._sh("tc", "qdisc", "add", "dev", "lo", "parent", f"1:{n}", "bfifo", "limit", queue)
        self._sh(
            "tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "src", f"{address}/32", "flowid", f"1:{n}",
        )  # fmt: skip
        self.nodes.append(address)
        return address

    @property
    def delay_implementation(self) -> Implementation | None:
        """The delay line that runs (None before start)."""
        return self._delay.implementation if self._delay is not None else None

    def close(self) -> int | None:
        """Take the namespace down; the delay line's exit status (0 when it stopped
        cleanly on SIGTERM; None if it never started)."""
        status = self._delay.stop() if self._delay is not None else None
        self._delay = None
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        return status

    def __enter__(self) -> WanNet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def python(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        """Run ``python -m anomos.bench.wan ARGS`` in the namespace; its JSON answer."""
        done = subprocess.run(
            [*self.prefix, sys.executable, "-m", "anomos.bench.wan", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise AnomosError(f"bench.wan {args[0]} failed: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def verify(self, a: str, b: str, size: int = 16 * MiB) -> dict[str, float]:
        """Measured RTT and bulk TCP rate between two nodes, and their error against the
        settings (the rate against the TCP payload a link of that rate carries)."""
        got = self.python("probe", a, b, str(size))
        want_rtt = 2 * self.profile.delay
        return {
            "rtt_ms": round(got["rtt"] * 1000, 2),
            "rtt_error": round(got["rtt"] / want_rtt - 1, 4),
            "rate_mbit": round(got["rate"] * 8 / 1e6, 2),
            "rate_error": round(got["rate"] * 8 / (self.profile.rate_bits * GOODPUT) - 1, 4),
        }

    def one_way(self, a: str, b: str, bursts: int = 20, burst: int = 10) -> list[tuple[int, float]]:
        """Datagrams from ``b`` to ``a`` in back-to-back bursts: each one's number and
        seconds on its way, in the order they arrived (the delay line, packet by packet)."""
        got = self.python("one-way", a, b, str(bursts), str(burst))
        return [(n, seconds) for n, seconds in got["arrived"]]


# ---------------------------------------------------------------------- in-namespace helpers
def _one_way(a: str, b: str, bursts: int, burst: int) -> dict[str, list[tuple[int, float]]]:
    """Numbered datagrams from ``b`` to ``a``, ``burst`` at once every 2 ms."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((a, 0))
    rx.settimeout(10)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((b, 0))
    sent: dict[int, float] = {}
    arrived: list[tuple[int, float]] = []

    def reader() -> None:
        while len(arrived) < len(sent) or len(sent) < bursts * burst:
            try:
                n = int(rx.recv(64))
            except TimeoutError:
                return
            arrived.append((n, time.monotonic()))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(bursts):
        for j in range(burst):
            n = i * burst + j
            sent[n] = time.monotonic()
            tx.sendto(str(n).encode(), rx.getsockname())
        time.sleep(0.002)
    thread.join()
    return {"arrived": [(n, at - sent[n]) for n, at in arrived]}


def _probe(a: str, b: str, size: int) -> dict[str, float]:
    """Median TCP-connect RTT from ``a`` to ``b``; then ``b``'s steady send rate to ``a``."""
    listener = socket.create_server((a, 0))
    rtts = []
    for _ in range(5):
        c = socket.socket()
        c.bind((b, 0))
        t = time.perf_counter()
        c.connect(listener.getsockname())
        rtts.append(time.perf_counter() - t)
        listener.accept()[0].close()
        c.close()
    marks: list[tuple[float, int]] = []

    def sink() -> None:
        conn, _ = listener.accept()
        got = 0
        while got < size:
            data = conn.recv(1 << 20)
            if not data:
                break
            got += len(data)
            marks.append((time.perf_counter(), got))
        conn.close()

    reader = threading.Thread(target=sink)
    reader.start()
    c = socket.create_connection(listener.getsockname(), source_address=(b, 0))
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        c.sendall(block)
    reader.join()
    c.close()
    # The rate after slow start: the second half of the bytes over its time.
    half = next(i for i, (_, got) in enumerate(marks) if got >= size // 2)
    (t0, b0), (t1, b1) = marks[half], marks[-1]
    return {"rtt": statistics.median(rtts), "rate": (b1 - b0) / (t1 - t0)}


def _libtorrent(
    seed_addr: str, get_addr: str, atorrent: str, data: str, dest: str
) -> dict[str, Any]:
    """Seed from one address, download directly from another; times from launch."""
    launched = time.monotonic()
    import importlib

    lt: Any = importlib.import_module("libtorrent")  # typed loosely: its stubs disagree with it

    from anomos.torrent.metainfo import Metainfo

    meta = Metainfo.load(Path(atorrent))
    info = lt.torrent_info(lt.bdecode(b"d4:info" + meta.info_bytes + b"e"))

    def session(addr: str) -> Any:
        return lt.session(
            {
                "listen_interfaces": f"{addr}:0",
                "outgoing_interfaces": addr,
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "enable_outgoing_utp": False,
                "enable_incoming_utp": False,
                "allow_multiple_connections_per_ip": True,
            }
        )

    seeder, getter = session(seed_addr), session(get_addr)
    params = lt.add_torrent_params()
    params.ti = info
    params.save_path = data
    params.flags |= lt.torrent_flags.seed_mode
    seeding = seeder.add_torrent(params)
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(info)
    params.save_path = dest
    getting = getter.add_torrent(params)
    while not seeding.status().is_seeding:
        time.sleep(0.01)
    started = time.monotonic()
    getting.connect_peer((seed_addr, seeder.listen_port()))
    first = None
    while True:
        st = getting.status()
        if first is None and st.total_wanted_done > 0:
            first = time.monotonic()
        if st.is_seeding:
            break
        time.sleep(0.005)
    done = time.monotonic()
    return {
        "seconds": done - started,
        "first_byte": (first or done) - launched,
        "launch_seconds": done - launched,
    }


# ---------------------------------------------------------------------- the benchmark
@attrs.frozen
class WanOptions:
    profiles: tuple[Profile, ...] = PROFILES
    size: int = 32 * MiB
    runs: int = 3
    relays: int = 6
    sources: int = 4
    #: Relays per circuit, as the tracker's ``--relays`` (its default when None).
    circuit_relays: str | None = None
    timeout: float = 300.0
    #: A slower uplink for every relay than for the seeder: the relay next to the
    #: seeder then receives faster than it can forward, and the bytes it queues
    #: show whether backpressure works (end-to-end windows bound them).
    relay_bits: int | None = None
    #: Seconds the network may settle before the download starts (a downloader
    #: joins a network whose neighbour graph is already in place).
    settle: float = 3.0
    #: Run the anomos processes from this source tree (a before/after comparison).
    code: Path | None = None
    #: Trace each anomos run every 0.25 s (:mod:`anomos.bench.wantrace`): every node's
    #: uplink and sockets, each circuit's window and bytes in flight, each process's
    #: wait for a CPU; the report gets the analysis.
    trace: bool = False
    #: Only the start (:func:`run_fast_start`): each run launches ``anomos get`` on a
    #: network that settled, from ``code`` and from this tree in turn, no libtorrent.
    fast_start: bool = False
    #: The emulation's delay line (None: the C one where a compiler exists).
    delay_line: Implementation | None = None


def _anomos_run(net: WanNet, work: Path, data: Path, options: WanOptions) -> dict[str, Any]:
    from anomos.localnet import LocalNetwork
    from anomos.torrent.metainfo import make_metainfo

    # Bytecode cached as an installed anomos has it: a launch must not compile every
    # module from source (the development shell sets PYTHONDONTWRITEBYTECODE).
    env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(work.parent / "pycache")}
    if options.code is not None:  # and not the tree in the current directory (-m adds it)
        env |= {"PYTHONPATH": str(options.code), "PYTHONSAFEPATH": "1"}
    trace = work / "trace"
    if options.trace:
        from anomos.torrent.flowtrace import TRACE_ENV

        trace.mkdir(exist_ok=True)
        env[TRACE_ENV] = str(trace)
    local = LocalNetwork(work / "anomos", verbose=1, extra_env=env)
    try:
        hops = ("--relays", options.circuit_relays) if options.circuit_relays else ()
        local.start_tracker(*hops, host=net.add_node(), prefix=net.prefix)
        meta = make_metainfo(
            data, trackers=[local.tracker_url], fingerprint=local.fingerprint, progress=False
        )
        atorrent = work / "bench.atorrent"
        meta.save(atorrent)
        for i in range(options.relays):
            host = net.add_node(options.relay_bits)
            local.start_peer(f"relay{i}", "relay", host=host, prefix=net.prefix)
        seed_host = net.add_node()
        local.start_peer(
            "seed", "seed", str(atorrent), "--data", str(data),
            host=seed_host, prefix=net.prefix,
        )  # fmt: skip
        summary = work / "summary.json"
        time.sleep(options.settle)
        launched = time.monotonic()
        proc = local.start_peer(
            "get", "get", str(atorrent), "--dest", str(work / "got"), "--summary", str(summary),
            "--sources", str(options.sources), "--timeout", str(options.timeout),
            host=net.add_node(), prefix=net.prefix, wait=False,
        )  # fmt: skip
        watched = {p.name: p.pid for p in local.procs} | net.pids()
        start_cpu = _cpu_seconds(watched)
        uplink = None
        if options.trace:
            uplink = UplinkWatch(net.prefix, seed_host, trace / "uplink.jsonl", watched)
            uplink.start()
        relays = [p for p in local.procs if p.name.startswith("relay")]
        queues = QueueWatch(net, relays)
        queues.start()
        try:
            rc = proc.popen.wait(options.timeout + 30)
        finally:
            queues.stop()
            if uplink is not None:
                uplink.stop()
        seconds = time.monotonic() - launched
        if rc != 0:
            raise AnomosError(f"anomos get exited {rc}: {proc.log_tail(8)}")
        report = json.loads(summary.read_text())
        report["launch_seconds"] = seconds
        report["start_trouble"] = start_trouble(work / "anomos")
        report["relay_queues"] = queues.peaks()
        if options.trace:
            report["trace"] = analyse(trace, net.profile.rate_bits)
        # Cores each process used while `get` ran: a saturated one is the cap.
        end_cpu = _cpu_seconds(watched)
        report["cores"] = {
            name: round((end_cpu[name] - start_cpu.get(name, 0.0)) / seconds, 2)
            for name in end_cpu
            if name != "get"
        }
        return report
    finally:
        local.stop()


#: Log lines of a start that went wrong somewhere (issue 13: none on a healthy network).
TROUBLE = {
    # the downloader could not link to a neighbour (an AUTH_OK that did not come, ...)
    "dial_failures": re.compile(r"cannot link to NID"),
    # the tracker refused or planned nothing ("announce before requesting circuits", ...)
    "circuit_refusals": re.compile(r"no circuits|tracker busy|tracker lost track"),
    # a neighbour refused a link; not the tracker's reachability probe, which hangs up
    "links_refused": re.compile(r"refused link from (?!.*waiting for AUTH)"),
}


#: Trouble lines of each kind shown on stderr per run (the rest are only counted).
TROUBLE_SHOWN = 3


def start_trouble(logs: Path, getter: str = "get") -> dict[str, int]:
    """Counts of :data:`TROUBLE` lines in every peer's log under ``logs`` from the
    getter's first line on (the network forming before it is not its start); the
    first few of each kind are shown, so that a count comes with its cause."""
    counts = dict.fromkeys(TROUBLE, 0)
    first = next(iter(_stamped(logs / f"{getter}.log")), "")
    for log_file in sorted(logs.glob("*.log")):
        for line in _stamped(log_file):
            if line < first:  # "2026-12-05 17:11:00,464 ...": text order is time order
                continue
            for name, pattern in TROUBLE.items():
                if pattern.search(line):
                    counts[name] += 1
                    if counts[name] <= TROUBLE_SHOWN:
                        print(f"  {name} in {log_file.name}: {line}", file=sys.stderr)
    return counts


def _stamped(log_file: Path) -> list[str]:
    """The lines of a peer's log that begin with a timestamp."""
    if not log_file.exists():
        return []
    lines = log_file.read_text(errors="replace").splitlines()
    return [line for line in lines if line[:4].isdigit()]


class QueueWatch(threading.Thread):
    """Samples, at each relay, what it holds for others: bytes in its TCP send
    queues (``ss``) and its memory above the level before the download (its own
    per-circuit queues live there); the peaks are the relay's queueing."""

    def __init__(self, net: WanNet, relays: Sequence[Any], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.net, self.relays, self.interval = net, relays, interval
        self._stop_event = threading.Event()
        self.base_rss = {p.name: _rss(p.pid) for p in relays}
        self.peak_send_q = {p.name: 0 for p in relays}
        self.peak_rss = dict(self.base_rss)

    def run(self) -> None:
        by_addr = {p.host: p.name for p in self.relays}
        while not self._stop_event.wait(self.interval):
            out = subprocess.run(
                [*self.net.prefix, "ss", "-tniH"], capture_output=True, text=True
            ).stdout
            send_q = dict.fromkeys(self.peak_send_q, 0)
            for local, _peer, queued, _info in tcp_sockets(out):
                name = by_addr.get(local.rpartition(":")[0])
                if name is not None:
                    send_q[name] += queued
            for name, q in send_q.items():
                self.peak_send_q[name] = max(self.peak_send_q[name], q)
            for p in self.relays:
                self.peak_rss[p.name] = max(self.peak_rss[p.name], _rss(p.pid))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def peaks(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "send_queue": self.peak_send_q[name],
                "memory_growth": self.peak_rss[name] - self.base_rss[name],
            }
            for name in self.peak_send_q
        }


def _rss(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = t.user + t.system
    return out


def run_wan(
    options: WanOptions, workdir: Path, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every profile, ``runs`` rounds of libtorrent then anomos in the same namespace."""
    reason = unavailable()
    if reason is not None:
        raise AnomosError(f"bench --wan {reason}")
    data = workdir / "share" / "bench.bin"
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "wb") as f:
        for _ in range(options.size // MiB):
            f.write(os.urandom(MiB))
    results: list[dict[str, Any]] = []
    for profile in options.profiles:
        entry: dict[str, Any] = {"profile": profile.name, "runs": []}
        for run in range(options.runs):
            work = workdir / f"{profile.rate_bits}-{profile.delay}-{run}"
            work.mkdir(parents=True, exist_ok=True)
            with WanNet(profile, delay_line=options.delay_line) as net:
                if run == 0:
                    entry["verify"] = net.verify(net.add_node(), net.add_node())
                    kind = net.delay_implementation
                    entry["delay_line"] = kind.value if kind is not None else None
                    echo(f"{profile.name}: measured {entry['verify']}, {entry['delay_line']}")
                lt_result = _lt_in(net, work, data)
                anomos = _anomos_run(net, work, data, options)
            one = {"libtorrent": lt_result, "anomos": anomos}
            echo(f"{profile.name} run {run + 1}: " + _line(options.size, one))
            if anomos.get("trace"):
                echo(f"  trace: {json.dumps(anomos['trace'])}")
            entry["runs"].append(one)
        results.append(entry)
    return {"size": options.size, "relays": options.relays, "profiles": results}


def run_fast_start(
    options: WanOptions, workdir: Path, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """``runs`` rounds per profile; in each, one start of ``options.code`` (if given) and
    one of this tree, each in a fresh namespace, the order alternating between rounds
    so that neither always meets the busier minute."""
    reason = unavailable()
    if reason is not None:
        raise AnomosError(f"bench --wan {reason}")
    data = workdir / "share" / "bench.bin"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(os.urandom(options.size))
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if options.code is not None:
        trees.insert(0, (str(options.code), options.code))
    results: list[dict[str, Any]] = []
    for profile in options.profiles:
        entry: dict[str, Any] = {"profile": profile.name, "trees": {}}
        for run in range(options.runs):
            order = trees if run % 2 == 0 else trees[::-1]
            for label, code in order:
                work = workdir / f"fast-{profile.rate_bits}-{profile.delay}-{run}-{code is None}"
                work.mkdir(parents=True, exist_ok=True)
                with WanNet(profile, delay_line=options.delay_line) as net:
                    report = _anomos_run(net, work, data, attrs.evolve(options, code=code))
                entry["trees"].setdefault(label, []).append(report)
                steps = report.get("startup", {})
                echo(
                    f"{profile.name} run {run + 1}, {label}: first piece "
                    f"{steps.get('first_piece')} s from launch, {report['start_trouble']}"
                )
        results.append(entry)
    return {"size": options.size, "relays": options.relays, "fast_start": results}


def summarize_fast_start(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per profile and tree: median seconds from launch to each step of the start, from
    the download loop's start to the first block, and what went wrong (summed)."""
    rows = []
    for entry in result["fast_start"]:
        for label, runs in entry["trees"].items():
            loop_to_block = [
                r["startup"]["first_block"] - r["startup"]["download"]
                for r in runs
                if {"first_block", "download"} <= r.get("startup", {}).keys()
            ]
            trouble: dict[str, int] = {}
            for r in runs:
                for name, n in r.get("start_trouble", {}).items():
                    trouble[name] = trouble.get(name, 0) + n
            rows.append(
                {
                    "profile": entry["profile"],
                    "tree": label,
                    "runs": len(runs),
                    "startup": _startup_medians([{"anomos": r} for r in runs]),
                    "loop_to_first_block": _median_or_none(loop_to_block),
                    "first_byte": _median_or_none([r.get("first_byte_seconds") for r in runs]),
                    "circuit_setup_seconds": _median_or_none(
                        [c.get("setup_seconds") for r in runs for c in r["circuits"]]
                    ),
                    "failed_circuits": sum(r.get("failed_circuits", 0) for r in runs),
                    "trouble": trouble,
                }
            )
    return rows


def fast_start_table(rows: list[dict[str, Any]]) -> str:
    """Steps down, trees across: median seconds from launch (medians of each step)."""
    out = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        mine = [r for r in rows if r["profile"] == profile]
        steps = list(dict.fromkeys(step for r in mine for step in r["startup"]))
        steps.sort(key=lambda step: min(r["startup"].get(step, 1e9) for r in mine))
        out.append(f"{profile}, median of {', '.join(str(r['runs']) for r in mine)} runs")
        out.append("| step (seconds from launch) | " + " | ".join(r["tree"] for r in mine) + " |")
        out.append("|---" * (len(mine) + 1) + "|")
        for step in steps:
            cells = " | ".join(str(r["startup"].get(step, "-")) for r in mine)
            out.append(f"| {step} | {cells} |")
        for name, key in (
            ("download loop start -> first block", "loop_to_first_block"),
            ("circuit set-up (median)", "circuit_setup_seconds"),
            ("circuits that failed to build", "failed_circuits"),
        ):
            out.append(f"| {name} | " + " | ".join(str(r[key]) for r in mine) + " |")
        for name in TROUBLE:
            counts = " | ".join(str(r["trouble"].get(name, 0)) for r in mine)
            out.append(f"| {name} | {counts} |")
        out.append("")
    return "\n".join(out)


def _lt_in(net: WanNet, work: Path, data: Path) -> dict[str, Any]:
    from anomos.torrent.metainfo import make_metainfo

    meta = make_metainfo(data, trackers=["https://127.0.0.1:1/announce"], fingerprint="00" * 32,
                         progress=False)  # fmt: skip
    torrent = work / "lt.atorrent"
    meta.save(torrent)
    dest = work / "lt-got"
    dest.mkdir(exist_ok=True)
    return net.python(
        "libtorrent", net.add_node(), net.add_node(), str(torrent), str(data.parent), str(dest)
    )


def _mbs(size: int, seconds: float) -> float:
    return size / seconds / 1e6 if seconds > 0 else 0.0


def _line(size: int, one: dict[str, Any]) -> str:
    lt_rate = _mbs(size, one["libtorrent"]["seconds"])
    an_rate = _mbs(size, one["anomos"]["seconds"])
    return (
        f"libtorrent {lt_rate:.2f} MB/s, anomos {an_rate:.2f} MB/s "
        f"(ratio {an_rate / lt_rate:.2f}), first byte {one['anomos'].get('first_byte_seconds')} s, "
        f"wasted {_wasted(one['anomos'])}"
    )


def _wasted(report: dict[str, Any]) -> float | None:
    """Piece bytes anomos received beyond what it lacked, as a fraction of that: endgame
    copies, blocks asked twice (None from a summary without the figures)."""
    left, got = report.get("left_at_start"), report.get("downloaded")
    if not left or got is None:
        return None
    return round(got / left - 1, 4)


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians per profile, and the per-circuit rates grouped by relay count."""
    size = result["size"]
    rows = []
    for entry in result["profiles"]:
        runs = entry["runs"]
        lt_rates = [_mbs(size, r["libtorrent"]["seconds"]) for r in runs]
        an_rates = [_mbs(size, r["anomos"]["seconds"]) for r in runs]
        ratios = [a / b for a, b in zip(an_rates, lt_rates, strict=True)]
        # From the first byte on: the flow control's part, without the set-up.
        lt_flow = [_mbs(size, r["libtorrent"]["launch_seconds"] - r["libtorrent"]["first_byte"])
                   for r in runs]  # fmt: skip
        an_flow = [_after_first_byte(size, r["anomos"]) for r in runs]
        flow_ratios = [a / b for a, b in zip(an_flow, lt_flow, strict=True) if a is not None]
        by_relays: dict[int, list[float]] = {}
        peaks: dict[int, list[int]] = {}
        for r in runs:
            for c in r["anomos"]["circuits"]:
                if c["seconds"] > 0 and c["received"] > 0:
                    by_relays.setdefault(c["relays"], []).append(c["received"] / c["seconds"] / 1e6)
                    peaks.setdefault(c["relays"], []).append(c.get("peak_in_flight", 0))
        rows.append(
            {
                "profile": entry["profile"],
                "verify": entry.get("verify"),
                "delay_line": entry.get("delay_line"),
                "libtorrent_mbs": round(statistics.median(lt_rates), 2),
                "anomos_mbs": round(statistics.median(an_rates), 2),
                "ratio": round(statistics.median(ratios), 2),
                "libtorrent_after_first_byte_mbs": round(statistics.median(lt_flow), 2),
                "anomos_after_first_byte_mbs": _median_or_none(an_flow),
                "ratio_after_first_byte": _median_or_none(flow_ratios),
                "lt_first_byte": round(
                    statistics.median(r["libtorrent"]["first_byte"] for r in runs), 2
                ),
                "anomos_first_byte": _median_or_none(
                    [r["anomos"].get("first_byte_seconds") for r in runs]
                ),
                "wasted": _median_or_none([_wasted(r["anomos"]) for r in runs], 3),
                "anomos_startup": _startup_medians(runs),
                "circuit_setup_seconds": _median_or_none(
                    [c.get("setup_seconds") for r in runs for c in r["anomos"]["circuits"]]
                ),
                "failed_circuits": sum(r["anomos"].get("failed_circuits", 0) for r in runs),
                "get_cpu_seconds": _median_or_none([r["anomos"].get("cpu_seconds") for r in runs]),
                "anomos_launch_seconds": _median_or_none(
                    [r["anomos"].get("launch_seconds") for r in runs]
                ),
                "relay_send_queue_kib": max(
                    (
                        q["send_queue"] // 1024
                        for r in runs
                        for q in r["anomos"].get("relay_queues", {}).values()
                    ),
                    default=None,
                ),
                "relay_memory_growth_kib": max(
                    (
                        q["memory_growth"] // 1024
                        for r in runs
                        for q in r["anomos"].get("relay_queues", {}).values()
                    ),
                    default=None,
                ),
                "per_circuit_mbs": {
                    k: round(statistics.median(v), 2) for k, v in sorted(by_relays.items())
                },
                "peak_in_flight_kib": {
                    k: round(statistics.median(v) / 1024) for k, v in sorted(peaks.items())
                },
                "runs": len(runs),
            }
        )
    return rows


def _after_first_byte(size: int, report: dict[str, Any]) -> float | None:
    """MB/s from anomos' first block on: ``seconds`` counts from the download's start,
    ``first_byte_seconds`` from launch (``startup["download"]`` after it)."""
    first = report.get("first_byte_seconds")
    if first is None:
        return None
    return _mbs(size, report["seconds"] - (first - report.get("startup", {}).get("download", 0)))


def _startup_medians(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median seconds from launch to each step of anomos' start."""
    steps: dict[str, list[float]] = {}
    for r in runs:
        for step, at in r["anomos"].get("startup", {}).items():
            steps.setdefault(step, []).append(at)
    medians = {step: round(statistics.median(v), 2) for step, v in steps.items()}
    return dict(sorted(medians.items(), key=lambda m: m[1]))


def _median_or_none(values: Sequence[float | None], digits: int = 2) -> float | None:
    got = [v for v in values if v is not None]
    return round(statistics.median(got), digits) if got else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| per-node profile | libtorrent | anomos | ratio | after the first byte (lt / anomos "
        "/ ratio) | first byte (lt / anomos) | per circuit by relays (MB/s) "
        "| peak in flight by relays (KiB) | wasted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{k}: {v}" for k, v in r["per_circuit_mbs"].items())
        peak = ", ".join(f"{k}: {v}" for k, v in r["peak_in_flight_kib"].items())
        lines.append(
            f"| {r['profile']} | {r['libtorrent_mbs']} MB/s | {r['anomos_mbs']} MB/s "
            f"| {r['ratio']} | {r['libtorrent_after_first_byte_mbs']} / "
            f"{r['anomos_after_first_byte_mbs']} MB/s / {r['ratio_after_first_byte']} "
            f"| {r['lt_first_byte']} s / {r['anomos_first_byte']} s | {per} "
            f"| {peak} | {r.get('wasted')} |"
        )
    for r in rows:
        steps = ", ".join(f"{k} {v}" for k, v in r.get("anomos_startup", {}).items())
        lines.append(
            f"\n{r['profile']}: anomos start, median seconds from launch: {steps}; "
            f"circuit set-up {r.get('circuit_setup_seconds')} s (median); "
            f"circuits that failed to build: {r['failed_circuits']}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """In-namespace helpers: ``probe A B SIZE``, ``one-way A B BURSTS BURST`` and
    ``libtorrent SEED GET TORRENT DATA DEST``."""
    if argv[0] == "probe":
        print(json.dumps(_probe(argv[1], argv[2], int(argv[3]))))
    elif argv[0] == "one-way":
        print(json.dumps(_one_way(argv[1], argv[2], int(argv[3]), int(argv[4]))))
    elif argv[0] == "libtorrent":
        print(json.dumps(_libtorrent(*argv[1:6])))
    else:
        sys.stderr.write(f"unknown helper {argv[0]!r}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
