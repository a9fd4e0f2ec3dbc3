"""Registries, the plugin facade and the ``anomos plugins`` command."""

import json
import os
import subprocess
import sys

import pytest

from anomos import hookimpl
from anomos.entrypoints import declared, entry_point_groups
from anomos.errors import ConfigError, PluginError
from anomos.pluginmanager import ENTRY_POINT_GROUP, get_plugins
from anomos.registry import Registry
from anomos.testing import run_anomos, write_dist_info


def test_registry_refuses_duplicates_and_names_unknowns():
    reg: Registry[object] = Registry("transport")
    reg.add("tcp", object)
    with pytest.raises(PluginError, match="registered twice"):
        reg.add("tcp", object)
    with pytest.raises(ConfigError, match=r"unknown transport 'udp' \(available: tcp\)"):
        reg.get("udp")


def test_lifecycle_event_failure_is_not_fatal(caplog):
    seen = []

    class Listener:
        @hookimpl
        def anomos_piece_verified(self, torrent, index):
            seen.append(index)

    class Broken:
        @hookimpl
        def anomos_piece_verified(self, torrent, index):
            raise RuntimeError("boom")

    plugins = get_plugins(load_entrypoints=False, extra=[Listener(), Broken()])
    plugins.notify("anomos_piece_verified", torrent=None, index=7)
    assert seen == [7]
    assert "anomos_piece_verified" in caplog.text


def test_late_plugin_gets_historic_registration():
    plugins = get_plugins(load_entrypoints=False)

    class Late:
        name = "late"

    class LatePlugin:
        @hookimpl
        def anomos_register_transports(self, registry):
            registry.add("late", Late)

    plugins.pm.register(LatePlugin())
    assert "late" in plugins.transports


def test_plugins_command_lists_a_default_for_each_kind():
    result = run_anomos("plugins", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    registered = data["registered"]
    for kind in ("transport", "path policy", "cipher suite", "ratio policy"):
        assert registered[kind], f"no {kind} registered"
    assert "tcp" in registered["transport"]
    assert "anomos_register_transports" in data["plugins"]["anomos.plugins.transports.tcp"]


def test_a_launch_reads_no_distribution_metadata_without_third_party_plugins():
    """gevent's and pluggy's entry-point scans and tqdm's version lookup each import
    importlib.metadata and parse every installed distribution: 0.2-0.3 CPU-s of
    every launch. Without a plugin that would need it, none of that runs."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "anomos", "get", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, ANOMOS_PROGRESS="0"),
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "anomos.cli" in imported  # (the report is there)
    assert {"importlib.metadata", "tqdm", "sqlite3"}.isdisjoint(imported)
    # The peer's own modules (0.15-0.2 CPU-s) come after the tracker's dial, not with
    # the commands (tests/test_launch.py).
    peer_modules = {"anomos.tracker.client", "anomos.peer.download", "anomos.peer.node"}
    assert peer_modules.isdisjoint(imported)
    assert {"cryptography.x509", "http.client"}.isdisjoint(imported)


def test_entry_point_groups_are_read_from_the_metadata_folders(tmp_path):
    site = write_dist_info(tmp_path / "site", "anomos-extra", {"extra": "extra_mod"})
    gevent_only = tmp_path / "gevent-site" / "gevent-1.0.dist-info"
    gevent_only.mkdir(parents=True)
    (gevent_only / "entry_points.txt").write_text("[gevent.plugins.monkey.will_patch_all]\nx = y\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "old.egg-info").write_text("Metadata-Version: 1.0\n")  # an egg-info *file*
    assert entry_point_groups([str(site), str(tmp_path / "missing"), str(empty)]) == {
        "anomos_extra": {"anomos"}
    }
    assert entry_point_groups([str(tmp_path / "gevent-site")]) == {
        "gevent": {"gevent.plugins.monkey.will_patch_all"}
    }
    zipped = tmp_path / "plugins.zip"
    zipped.write_bytes(b"PK\x05\x06" + bytes(18))
    assert entry_point_groups([str(empty), str(zipped)]) is None  # unsure: look inside


def test_sys_path_is_scanned_once_until_a_folder_on_it_changes(tmp_path, monkeypatch):
    """gevent's patching and the plugin manager both ask at launch: one scan serves both,
    and a distribution installed afterwards is still seen."""
    from anomos import entrypoints

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    scans = []
    real = entrypoints.entry_point_groups
    monkeypatch.setattr(entrypoints, "entry_point_groups", lambda: scans.append(1) or real())
    assert not declared("anomos-once-group")
    assert not declared("anomos-once-group")
    assert len(scans) == 1
    info = site / "once-1.0.dist-info"
    info.mkdir()
    (info / "entry_points.txt").write_text("[anomos-once-group]\nx = y\n")
    os.utime(site, ns=(0, os.stat(site).st_mtime_ns + 1))  # (coarse clocks: a new mtime)
    assert declared("anomos-once-group")
    assert len(scans) == 2


def test_a_third_party_plugin_is_still_loaded_from_its_entry_point(install_plugin, tmp_path):
    """The fast check must not hide an installed plugin from pluggy's scan."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "fastcheck_plugin.py").write_text(
        "from anomos import hookimpl\n\n"
        "class Quiet:\n    name = 'quiet'\n\n"
        "@hookimpl\ndef anomos_register_transports(registry):\n"
        "    registry.add('quiet', Quiet)\n"
    )
    assert not declared(ENTRY_POINT_GROUP) or "quiet" not in get_plugins().transports
    install_plugin("fastcheck-plugin", {"fastcheck": "fastcheck_plugin"}, source=source)
    assert declared(ENTRY_POINT_GROUP)
    plugins = get_plugins()
    assert "quiet" in plugins.transports
    assert "fastcheck" in dict(plugins.pm.list_name_plugin())
