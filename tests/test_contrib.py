"""The example plugins in plugins-contrib/, loaded the way an installed plugin is.

Each package is made loadable through the real ``anomos`` entry-point group
(its source dir on ``sys.path`` plus a dist-info declaring the entry points
read from its own ``setup.cfg``), so ``get_plugins()`` finds it with
``load_setuptools_entrypoints`` exactly as after ``pip install``.
"""

from __future__ import annotations

import configparser
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
import zlib
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import pytest

from anomos import hookimpl
from anomos.cli import build_cli
from anomos.errors import ConfigError, PluginError
from anomos.interfaces import (
    CipherSuite,
    Listener,
    PathPolicy,
    PeerGraphView,
    RatioPolicy,
    Transport,
)
from anomos.pluginmanager import Plugins, get_plugins
from anomos.testing import anomos_cmd, write_dist_info
from anomos.tracker.graph import PeerGraph

CONTRIB = Path(__file__).resolve().parent.parent / "plugins-contrib"
PACKAGES = ("anomos-ratio-strict", "anomos-path-shortest", "anomos-hooklog")


def package_metadata(package: str) -> tuple[str, dict[str, str]]:
    """(distribution name, anomos entry points) as the package's setup.cfg declares them."""
    cfg = configparser.ConfigParser()
    cfg.read(CONTRIB / package / "setup.cfg")
    lines = cfg["options.entry_points"]["anomos"].strip().splitlines()
    entry_points = dict(line.replace(" ", "").split("=", 1) for line in lines)
    return cfg["metadata"]["name"], entry_points


def install_contrib(install_plugin: Callable[..., Path], package: str) -> dict[str, str]:
    dist, entry_points = package_metadata(package)
    install_plugin(dist, entry_points, source=CONTRIB / package / "src")
    return entry_points


@pytest.fixture
def contrib(install_plugin: Callable[..., Path]) -> Plugins:
    """A plugin facade with all three contrib packages loaded from entry points."""
    for package in PACKAGES:
        install_contrib(install_plugin, package)
    return get_plugins()


# ----------------------------------------------------------------------------- packaging


def test_each_package_is_separately_installable_with_an_anomos_entry_point():
    for package in PACKAGES:
        root = CONTRIB / package
        assert (root / "README.md").is_file()
        assert "build-system" in (root / "pyproject.toml").read_text()
        dist, entry_points = package_metadata(package)
        assert dist == package
        (name, target), *rest = entry_points.items()
        assert not rest and (root / "src" / target / "__init__.py").is_file()
        assert name == package.removeprefix("anomos-")  # what ANOMOS_BLOCK_PLUGINS matches


def test_contrib_plugins_import_only_the_public_api():
    public = {"anomos", "anomos.interfaces", "anomos.errors", "anomos.config"}
    for package in PACKAGES:
        for source in (CONTRIB / package / "src").rglob("*.py"):
            for line in source.read_text().splitlines():
                words = line.split()
                if words[:1] in (["import"], ["from"]) and words[1].startswith("anomos."):
                    assert words[1] in public, f"{source}: {line}"


SETUP = "from setuptools import setup; setup()"


@pytest.mark.slow
@pytest.mark.integration
def test_setuptools_reads_the_same_entry_points_from_setup_cfg(tmp_path):
    """setuptools itself (egg_info, no network) agrees with what the tests load."""
    for package in PACKAGES:
        base = tmp_path / package
        base.mkdir()
        result = subprocess.run(
            [sys.executable, "-c", SETUP, "-q", "egg_info", "--egg-base", str(base)],
            cwd=CONTRIB / package,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        (info,) = base.glob("*.egg-info")
        declared = configparser.ConfigParser()
        declared.read(info / "entry_points.txt")
        assert dict(declared["anomos"]) == package_metadata(package)[1]
        assert "Version: 0.1.0" in (info / "PKG-INFO").read_text()


# ----------------------------------------------------------------------------- ratio-strict


def test_ratio_strict_registers_from_its_entry_point_and_gives_less_relay_credit(
    install_plugin,
):
    install_contrib(install_plugin, "anomos-ratio-strict")
    plugins = get_plugins()
    assert "anomos_register_ratio_policies" in plugins.implementations()["ratio-strict"]
    assert plugins.ratio_policies.owner("strict") == "anomos_ratio_strict"
    default = plugins.ratio_policy("relay-credit")
    strict = plugins.ratio_policy("strict")
    capped = plugins.ratio_policy("capped")

    # uploaded 100, downloaded 200, relayed 1000
    assert default.ratio(100, 200, 1000) == 5.5
    assert strict.credited_upload(100, 1000) == 100
    assert strict.ratio(100, 200, 1000) == 0.5
    assert capped.credited_upload(100, 1000) == 200  # relay credit capped at the upload
    assert capped.credited_upload(100, 30) == 130  # below the cap every relayed byte counts
    assert capped.ratio(100, 200, 1000) == 1.0
    # a pure relay earns nothing under either; edge cases as the default's
    for policy in (strict, capped):
        assert policy.ratio(0, 500, 10**9) == 0.0
        assert policy.ratio(0, 0, 0) == 0.0
        assert policy.ratio(1, 0, 0) == float("inf")
        assert policy.credited_upload(-50, -50) == 0


# ----------------------------------------------------------------------------- path-shortest


def simple_path_lengths(graph: Any, start: Hashable, end: Hashable, max_edges: int) -> set[int]:
    """Edge counts of every simple path start..end up to max_edges (brute force)."""
    found: set[int] = set()

    def walk(node: Hashable, seen: set[Hashable], edges: int) -> None:
        for n in graph.neighbours(node):
            if n == end:
                found.add(edges + 1)
            elif n not in seen and edges + 1 < max_edges:
                walk(n, seen | {n}, edges + 1)

    walk(start, {start}, 0)
    return {e for e in found if e <= max_edges}


def assert_valid(graph: Any, path: list[Hashable], start: Hashable, end: Hashable) -> None:
    assert path[0] == start and path[-1] == end
    assert len(set(path)) == len(path), "not a simple path"
    for a, b in itertools.pairwise(path):
        assert b in graph.neighbours(a), f"{a}-{b} is not an edge"


def test_path_shortest_is_the_shortest_path_with_enough_relays(install_plugin):
    install_contrib(install_plugin, "anomos-path-shortest")
    plugins = get_plugins()
    assert plugins.path_policies.owner("shortest") == "anomos_path_shortest"
    graph = PeerGraph(min_neighbours=2, max_neighbours=3, rng=random.Random(7))
    for peer in range(120):
        graph.add_peer(peer)
    rng = random.Random(1)
    checked = {"found": 0, "none": 0, "detour": 0}
    for min_relays, max_relays in ((1, 3), (2, 4), (3, 5)):
        policy = plugins.path_policy("shortest", min_relays=min_relays, max_relays=max_relays)
        for start, end in [rng.sample(range(120), 2) for _ in range(40)]:
            lengths = simple_path_lengths(graph, start, end, max_relays + 1)
            allowed = {e for e in lengths if e >= min_relays + 1}
            path = policy.find_path(graph, start, end, rng)
            if not allowed:
                assert path is None
                checked["none"] += 1
                continue
            assert path is not None
            assert_valid(graph, path, start, end)
            assert len(path) - 1 == min(allowed)
            checked["found"] += 1
            checked["detour"] += min(lengths) < min(allowed)
    assert all(checked.values()), checked  # every branch was exercised


def test_path_shortest_detours_around_a_direct_edge_and_refuses_bad_bounds(install_plugin):
    install_contrib(install_plugin, "anomos-path-shortest")
    plugins = get_plugins()
    # 0 - 1 directly, and 0 - 2 - 3 - 1 around: min 2 relays forces the detour
    edges = [(0, 1), (0, 2), (2, 3), (3, 1), (1, 4)]
    graph = DictGraph(edges)
    policy = plugins.path_policy("shortest", min_relays=2, max_relays=3)
    assert policy.find_path(graph, 0, 1, random.Random(0)) == [0, 2, 3, 1]
    assert policy.find_path(graph, 0, 99, random.Random(0)) is None  # not in the graph
    assert policy.find_path(graph, 4, 4, random.Random(0)) is None
    tight = plugins.path_policy("shortest", min_relays=3, max_relays=3)
    assert tight.find_path(graph, 0, 1, random.Random(0)) is None  # no 4-edge simple path
    for bad in ((0, 2), (3, 2), (2, 8)):
        with pytest.raises(ConfigError, match="relays"):
            plugins.path_policy("shortest", min_relays=bad[0], max_relays=bad[1])


class DictGraph:
    """A PeerGraphView from an edge list."""

    def __init__(self, edges: Iterable[tuple[Hashable, Hashable]]) -> None:
        self.adj: dict[Hashable, set[Hashable]] = {}
        for a, b in edges:
            self.adj.setdefault(a, set()).add(b)
            self.adj.setdefault(b, set()).add(a)

    def neighbours(self, peer: Hashable) -> Iterable[Hashable]:
        return self.adj[peer]

    def load(self, peer: Hashable) -> float:
        return 0.0

    def __contains__(self, peer: object) -> bool:
        return peer in self.adj

    def __len__(self) -> int:
        return len(self.adj)


class Counting:
    """Wraps a real PeerGraph and remembers which peers a search looked at."""

    def __init__(self, graph: PeerGraph) -> None:
        self.graph = graph
        self.touched: set[Hashable] = set()

    def neighbours(self, peer: Hashable) -> Iterable[Hashable]:
        self.touched.add(peer)
        return self.graph.neighbours(peer)

    def load(self, peer: Hashable) -> float:
        return self.graph.load(peer)

    def __contains__(self, peer: object) -> bool:
        return peer in self.graph

    def __len__(self) -> int:
        return len(self.graph)


@pytest.fixture(scope="module")
def big_graph() -> PeerGraph:
    graph = PeerGraph(rng=random.Random(3))  # 4-6 neighbours each
    for peer in range(100_000):
        graph.add_peer(peer)
    return graph


@pytest.mark.slow
def test_path_shortest_looks_at_few_peers_of_a_100k_graph(install_plugin, big_graph):
    install_contrib(install_plugin, "anomos-path-shortest")
    policy = get_plugins().path_policy("shortest", min_relays=2, max_relays=4)
    rng = random.Random(5)
    most = found = 0
    for i in range(60):
        start = rng.randrange(100_000)
        end = start
        for _ in range(i % 6):  # destinations 0-5 hops away, and far random ones
            end = rng.choice(list(big_graph.neighbours(end)))
        if i % 6 == 0:
            end = rng.randrange(100_000)
        view = Counting(big_graph)
        path = policy.find_path(view, start, end, rng)  # type: ignore[arg-type]
        most = max(most, len(view.touched))
        if path is not None:
            found += 1
            assert_valid(big_graph, path, start, end)
            assert 2 <= len(path) - 2 <= 4
    assert found >= 30
    # bounded by degree and relay count, not by the 100,000 peers
    assert most < 3_000, most


# ----------------------------------------------------------------------------- hooklog


def fake_peer(plugins: Plugins, address: str) -> Any:
    return types.SimpleNamespace(plugins=plugins, address=address)


def test_hooklog_writes_every_lifecycle_event_as_a_json_line(install_plugin, tmp_path):
    install_contrib(install_plugin, "anomos-hooklog")
    from anomos_hooklog import read_events

    plugins = get_plugins()
    log = tmp_path / "events.jsonl"
    plugins.options["hooklog"] = str(log)
    peer = fake_peer(plugins, "127.0.0.9:4000")
    circuit = object()
    torrent = types.SimpleNamespace(
        plugins=plugins, metainfo=types.SimpleNamespace(infohash=b"\xab" * 20)
    )
    plugins.notify("anomos_peer_started", peer=peer)
    plugins.notify("anomos_neighbour_up", peer=peer, nid=17, address="127.0.0.3:1")
    plugins.notify("anomos_circuit_opened", peer=peer, circuit=circuit)
    plugins.notify("anomos_piece_verified", torrent=torrent, index=3)
    plugins.notify("anomos_piece_failed", torrent=torrent, index=4, source="c1")
    plugins.notify("anomos_download_complete", torrent=torrent)
    plugins.notify("anomos_circuit_closed", peer=peer, circuit=circuit, reason="x" * 10_000)
    plugins.notify("anomos_neighbour_down", peer=peer, nid=17, reason="closed")
    plugins.notify("anomos_peer_stopped", peer=peer)

    events, bad = read_events(log)
    assert bad == 0
    assert [e["event"] for e in events] == [
        "peer_started",
        "neighbour_up",
        "circuit_opened",
        "piece_verified",
        "piece_failed",
        "download_complete",
        "circuit_closed",
        "neighbour_down",
        "peer_stopped",
    ]
    assert all(e["pid"] == os.getpid() and e["peer"] == "127.0.0.9:4000" for e in events[:3])
    assert events[1]["nid"] == 17 and events[1]["address"] == "127.0.0.3:1"
    assert events[2]["circuit"] == events[6]["circuit"]  # an open pairs with its close
    assert len(events[6]["reason"]) == 200  # text from the network is bounded
    assert events[3] | {"time": 0} == {
        "event": "piece_verified",
        "index": 3,
        "infohash": "ab" * 20,
        "pid": os.getpid(),
        "time": 0,
    }
    assert events[4]["source"] == "c1"
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_hooklog_records_a_real_tracker_using_the_other_contrib_policies(contrib, tmp_path):
    from anomos.tracker.server import Tracker
    from anomos.tracker.settings import TrackerSettings

    log = tmp_path / "tracker.jsonl"
    contrib.options["hooklog"] = str(log)
    tracker = Tracker(
        tmp_path / "t",
        "127.0.0.1:0",
        contrib,
        TrackerSettings(ratio_policy="strict", path_policy="shortest"),
    )
    assert tracker.ratio.name == "strict"
    tracker.start()
    try:
        address = tracker.address
    finally:
        tracker.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["address"]) for e in lines] == [
        ("tracker_started", address),
        ("tracker_stopped", address),
    ]
    assert not address.endswith(":0")


def test_hooklog_falls_back_to_the_environment_and_ignores_events_without_a_log(
    install_plugin, tmp_path, monkeypatch
):
    install_contrib(install_plugin, "anomos-hooklog")
    plugins = get_plugins()
    monkeypatch.delenv("ANOMOS_HOOKLOG", raising=False)
    plugins.notify("anomos_neighbour_down", peer=None, nid=1, reason="closed")  # nowhere: fine
    log = tmp_path / "env.jsonl"
    monkeypatch.setenv("ANOMOS_HOOKLOG", str(log))
    plugins.notify("anomos_neighbour_down", peer=None, nid=1, reason="timeout")
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["reason"] == "timeout" and entry["peer"] is None


class RoleCommand:
    """A stand-in for ``anomos seed``: a command with --listen that starts a 'peer'."""

    @hookimpl
    def anomos_add_commands(self, cli: Any) -> None:
        import click

        @click.command("role")
        @click.option("--listen", default="127.0.0.1:0")
        @click.pass_obj
        def role(plugins: Plugins, listen: str) -> None:
            plugins.notify("anomos_peer_started", peer=fake_peer(plugins, listen))

        cli.add_command(role)


def run_cli(plugins: Plugins, *args: str) -> Any:
    cli = build_cli(plugins)
    return cli.main(args=list(args), prog_name="anomos", obj=plugins, standalone_mode=False)


def test_hooklog_adds_its_option_to_role_commands_and_an_events_command(
    install_plugin, tmp_path, capsys
):
    install_contrib(install_plugin, "anomos-hooklog")
    from anomos_hooklog import MAX_LINE

    plugins = get_plugins(extra=[RoleCommand()])
    cli = build_cli(plugins)
    assert "hooklog" in {p.name for p in cli.commands["role"].params}
    for name, command in cli.commands.items():  # the roles get it; make, info, ... do not
        has = "hooklog" in {p.name for p in command.params}
        assert has == (name in {"role", "tracker", "seed", "get", "relay"}), name
    assert "events" in cli.commands

    log = tmp_path / "cli.jsonl"
    run_cli(plugins, "role", "--listen", "127.0.0.8:0", "--hooklog", str(log))
    assert plugins.options["hooklog"] == str(log)  # routed to the plugin, not the command
    with open(log, "ab") as f:  # a killed writer's partial line, and an endless one
        f.write(b'{"event": "peer_st\n' + b"x" * (MAX_LINE + 10) + b"\n")
    run_cli(get_plugins(extra=[RoleCommand()]), "role", "--hooklog", str(log))
    capsys.readouterr()

    run_cli(get_plugins(), "events", str(log), "--count", "--json")
    out, err = capsys.readouterr()
    assert json.loads(out) == {"peer_started": 2}
    assert "skipped 2 malformed line(s)" in err
    run_cli(get_plugins(), "events", str(log), "--event", "peer_started")
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and "peer=127.0.0.8:0" in lines[0] and "peer_started" in lines[1]
    with pytest.raises(ConfigError, match="cannot read event log"):
        run_cli(get_plugins(), "events", str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- broken plugins


def broken_plugin(
    install_plugin: Callable[..., Path], tmp_path: Path, name: str, code: str
) -> None:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    (src / f"{name}.py").write_text(f"from anomos import hookimpl\n\n{code}\n")
    install_plugin(f"anomos-{name}", {name: name}, source=src)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import anomos_no_such_module\n", "anomos_no_such_module"),
        ("raise RuntimeError('half-installed')\n", "half-installed"),
        (
            "@hookimpl\ndef anomos_register_ratio_polices(registry):\n    pass\n",
            "anomos_register_ratio_polices",
        ),
        (
            "@hookimpl\ndef anomos_register_ratio_policies(registy):\n    pass\n",
            "registy",
        ),
        (
            "@hookimpl\ndef anomos_register_ratio_policies(registry):\n"
            "    registry.add('relay-credit', object)\n",
            "registered twice",
        ),
    ],
    ids=["import-error", "error-on-import", "hook-name-typo", "argument-typo", "duplicate-name"],
)
def test_a_broken_third_party_plugin_is_a_one_line_plugin_error(
    install_plugin, tmp_path, monkeypatch, code, message
):
    name = f"broken_{zlib.crc32(code.encode()):08x}"
    broken_plugin(install_plugin, tmp_path, name, code)
    with pytest.raises(PluginError) as info:
        get_plugins()
    text = str(info.value)
    assert message in text
    assert "\n" not in text, text
    # the user's way out: block it by its entry-point name
    monkeypatch.setenv("ANOMOS_BLOCK_PLUGINS", f"something-else, {name}")
    assert name not in get_plugins().implementations()


def test_block_plugins_blocks_an_entry_point_plugin_by_name(install_plugin, monkeypatch):
    for package in PACKAGES:
        install_contrib(install_plugin, package)
    assert {"hooklog", "path-shortest"} <= get_plugins().implementations().keys()
    monkeypatch.setenv("ANOMOS_BLOCK_PLUGINS", "hooklog,path-shortest")
    plugins = get_plugins()
    assert "hooklog" not in plugins.implementations()
    assert "shortest" not in plugins.path_policies
    assert "ratio-strict" in plugins.implementations()  # the others still load
    assert "events" not in build_cli(plugins).commands


# ----------------------------------------------------------------------------- CLI, for real


def contrib_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a subprocess that sees the contrib plugins as installed."""
    site = tmp_path / "site"
    paths = [str(site)]
    for package in PACKAGES:
        dist, entry_points = package_metadata(package)
        write_dist_info(site, dist, entry_points)
        paths.append(str(CONTRIB / package / "src"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), ANOMOS_PROGRESS="0")
    env.pop("ANOMOS_BLOCK_PLUGINS", None)
    env.pop("ANOMOS_HOOKLOG", None)
    return env


@pytest.mark.slow
@pytest.mark.integration
def test_anomos_plugins_json_lists_contrib_plugins_in_a_subprocess(tmp_path):
    env = contrib_env(tmp_path)
    result = subprocess.run(
        anomos_cmd("plugins", "--json"), capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert "anomos_register_ratio_policies" in data["plugins"]["ratio-strict"]
    assert "anomos_register_path_policies" in data["plugins"]["path-shortest"]
    assert {"anomos_add_commands", "anomos_add_options", "anomos_peer_started"} <= set(
        data["plugins"]["hooklog"]
    )
    assert data["registered"]["ratio policy"]["capped"] == "anomos_ratio_strict"
    assert data["registered"]["path policy"]["shortest"] == "anomos_path_shortest"

    log = tmp_path / "empty.jsonl"
    log.write_text("")
    events = subprocess.run(
        anomos_cmd("events", str(log), "--count"), capture_output=True, text=True, env=env
    )
    assert events.returncode == 0 and events.stdout == "", events.stderr


# ----------------------------------------------------------------------------- the guide

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def guide_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), re.M | re.S)


def test_guide_documents_every_method_of_the_four_protocols():
    text = GUIDE.read_text()
    for protocol in (Transport, PathPolicy, CipherSuite, RatioPolicy, PeerGraphView, Listener):
        methods = [n for n in vars(protocol) if not n.startswith("_") and n != "name"]
        assert methods
        for method in methods:
            assert f"def {method}(" in text, f"{protocol.__name__}.{method} is not in the guide"
    for block in guide_blocks():
        compile(block, str(GUIDE), "exec")


def test_guide_smallest_plugin_works_as_written():
    module = types.ModuleType("anomos_ratio_half")
    exec(guide_blocks()[0], module.__dict__)
    plugins = get_plugins(load_entrypoints=False, extra=[module])
    assert plugins.ratio_policy("half").ratio(100, 200, 100) == 0.75


@pytest.mark.slow
@pytest.mark.integration
def test_anomos_tracker_with_contrib_policies_and_hooklog_option(tmp_path):
    """The real CLI: --hooklog reaches the plugin, the tracker runs shortest + strict."""
    env = contrib_env(tmp_path)
    log = tmp_path / "tracker.jsonl"
    state = tmp_path / "tracker"
    proc = subprocess.Popen(
        anomos_cmd(
            *("tracker", "--state", str(state), "--listen", "127.0.0.1:0"),
            *("--path-policy", "shortest", "--ratio-policy", "strict", "--hooklog", str(log)),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (state / "tracker.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "tracker did not start"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    url = json.loads((state / "tracker.json").read_text())["url"]
    result = subprocess.run(
        anomos_cmd("events", str(log), "--json"), capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    assert [e["event"] for e in events] == ["tracker_started", "tracker_stopped"]
    assert events[0]["address"] in url and events[0]["pid"] == proc.pid


def test_the_lab_compares_an_installed_third_party_policy(install_plugin, tmp_path):
    """Issue 16: a researcher's own plugin is compared by `anomos lab` like a shipped
    policy (the path-shortest example, installed through its entry point)."""
    from click.testing import CliRunner

    install_contrib(install_plugin, "anomos-path-shortest")
    plugins = get_plugins()
    result = CliRunner().invoke(
        build_cli(plugins),
        [
            *("lab", "--peers", "60", "--days", "0.5", "--seeds", "2", "--jobs", "1"),
            *("--policy", "shortest", "--policy", "weighted", "--colluding", "0.1,0.2"),
            *("--json", str(tmp_path / "r.json")),
        ],
        obj=plugins,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["policies"]) == ["shortest", "weighted"]
    assert [line.split()[0] for line in result.output.splitlines()[1:5]] == (
        ["shortest"] * 2 + ["weighted"] * 2
    )
