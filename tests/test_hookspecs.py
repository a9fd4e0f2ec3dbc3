"""The hook reference in docs/hooks.md must match anomos/hookspecs.py exactly."""

import inspect
import re
from pathlib import Path

import pluggy
import pytest

from anomos import hookimpl, hookspecs
from anomos.errors import PluginError
from anomos.pluginmanager import DEFAULT_PLUGINS, get_plugin_manager

DOC = Path(__file__).parent.parent / "docs" / "hooks.md"


def specified() -> dict[str, list[str]]:
    return {
        name: list(inspect.signature(fn).parameters)
        for name, fn in vars(hookspecs).items()
        if name.startswith("anomos_") and callable(fn)
    }


def documented() -> dict[str, list[str]]:
    found = re.findall(r"^### `(anomos_\w+)\(([^)]*)\)`", DOC.read_text(), re.M)
    return {name: [a.strip() for a in args.split(",") if a.strip()] for name, args in found}


def test_every_hook_is_documented_with_its_signature():
    assert documented() == specified()


def test_every_hookspec_has_a_docstring_with_params():
    for name in specified():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert doc, name
        for param in specified()[name]:
            assert f":param {param}:" in doc, (name, param)


def test_unknown_hook_implementation_is_refused():
    class Typo:
        @hookimpl
        def anomos_register_transprots(self, registry):  # misspelt on purpose
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        get_plugin_manager(load_entrypoints=False, extra=[Typo()])


def test_each_manager_is_fresh():
    a = get_plugin_manager(load_entrypoints=False)
    b = get_plugin_manager(load_entrypoints=False)
    assert a is not b
    assert {n for n, _ in a.list_name_plugin()} >= set(DEFAULT_PLUGINS)
    assert isinstance(a, pluggy.PluginManager)


def test_blocking_a_plugin(monkeypatch):
    monkeypatch.setenv("ANOMOS_BLOCK_PLUGINS", "anomos.plugins.transports.tcp")
    pm = get_plugin_manager(load_entrypoints=False)
    assert pm.get_plugin("anomos.plugins.transports.tcp") is None
