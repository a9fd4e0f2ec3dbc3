"""Registries, the plugin facade and the ``anomos plugins`` command."""

import json

import pytest

from anomos import hookimpl
from anomos.errors import ConfigError, PluginError
from anomos.pluginmanager import get_plugins
from anomos.registry import Registry
from anomos.testing import run_anomos


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
