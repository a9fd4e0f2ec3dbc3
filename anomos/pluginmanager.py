"""Plugin loading and the typed facade the core uses instead of ``pm.hook``.

Every tracker and peer gets its *own* plugin manager (:func:`get_plugins`), so
many of them can live in one process, as they do in the tests.

Environment:

``ANOMOS_BLOCK_PLUGINS``
    comma-separated plugin names (module paths or entry-point names) not to load.
``ANOMOS_TRACE_HOOKS``
    when set to ``1``, every hook call is traced on standard error.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import pluggy

from anomos import PROJECT, entrypoints, hookspecs
from anomos.errors import PluginError
from anomos.interfaces import CipherSuite, PathPolicy, RatioPolicy, Transport
from anomos.registry import Registry

log = logging.getLogger(__name__)

#: The built-in plugins, written exactly as third-party plugins are.
DEFAULT_PLUGINS: tuple[str, ...] = (
    # transports
    "anomos.plugins.transports.tcp",
    "anomos.plugins.transports.socks5",
    "anomos.plugins.transports.tor",
    # path policies
    "anomos.plugins.paths.weighted",
    "anomos.plugins.paths.random_walk",
    "anomos.plugins.paths.fixed",
    "anomos.plugins.paths.original",
    "anomos.plugins.paths.guard",
    # cipher suites
    "anomos.plugins.ciphers.x25519",
    "anomos.plugins.ciphers.classic",
    # ratio accounting
    "anomos.plugins.ratio.relay_credit",
    # commands
    "anomos.plugins.commands.torrent_cmds",
    "anomos.plugins.commands.tracker_cmd",
    "anomos.plugins.commands.peer_cmds",
    "anomos.plugins.commands.demo_cmd",
    "anomos.plugins.commands.testnet_cmd",
    "anomos.plugins.commands.plugins_cmd",
    "anomos.plugins.commands.bench_cmd",
    "anomos.plugins.commands.paths_cmd",
    "anomos.plugins.commands.lab_cmd",
    "anomos.plugins.commands.daemon_cmd",
)

ENTRY_POINT_GROUP = PROJECT


def get_plugin_manager(
    *,
    load_entrypoints: bool = True,
    blocked: Iterable[str] = (),
    extra: Iterable[object] = (),
) -> pluggy.PluginManager:
    """A fresh, fully loaded plugin manager (never a module-level global)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    env_blocked = [b.strip() for b in os.environ.get("ANOMOS_BLOCK_PLUGINS", "").split(",")]
    for name in [*blocked, *env_blocked]:
        if name:
            pm.set_blocked(name)
    for modname in DEFAULT_PLUGINS:
        if pm.is_blocked(modname):
            continue
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:  # pragma: no cover - a broken install
            raise PluginError(f"cannot import built-in plugin {modname}: {exc}") from exc
        pm.register(module, name=modname)
    # (pluggy's scan imports importlib.metadata and reads every distribution: only
    # when one declares our group)
    if load_entrypoints and entrypoints.declared(ENTRY_POINT_GROUP):
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"third-party plugin {exc.plugin!r} is invalid: {_one_line(exc)}"
            ) from exc
        except Exception as exc:
            raise PluginError(f"cannot load a third-party anomos plugin: {_one_line(exc)}") from exc
    for plugin in extra:
        try:
            pm.register(plugin)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin is invalid: {_one_line(exc)}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin implements an unknown hook: {_one_line(exc)}") from exc
    if os.environ.get("ANOMOS_TRACE_HOOKS") == "1":
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class Plugins:
    """Typed facade over one plugin manager: registries and lifecycle events."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.transports: Registry[type[Transport]] = Registry("transport")
        self.path_policies: Registry[type[PathPolicy]] = Registry("path policy")
        self.cipher_suites: Registry[type[CipherSuite]] = Registry("cipher suite")
        self.ratio_policies: Registry[type[RatioPolicy]] = Registry("ratio policy")
        #: Values of options that plugins added with ``anomos_add_options``.
        self.options: dict[str, Any] = {}
        hook = pm.hook
        hook.anomos_register_transports.call_historic(kwargs={"registry": self.transports})
        hook.anomos_register_path_policies.call_historic(kwargs={"registry": self.path_policies})
        hook.anomos_register_cipher_suites.call_historic(kwargs={"registry": self.cipher_suites})
        hook.anomos_register_ratio_policies.call_historic(kwargs={"registry": self.ratio_policies})

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def registries(self) -> dict[str, Registry[Any]]:
        return {
            "transport": self.transports,
            "path policy": self.path_policies,
            "cipher suite": self.cipher_suites,
            "ratio policy": self.ratio_policies,
        }

    # ------------------------------------------------------------------ lookups
    def transport(self, name: str, settings: Any) -> Transport:
        return self.transports.get(name)(settings)  # type: ignore[call-arg]

    def path_policy(self, name: str, *, min_relays: int, max_relays: int) -> PathPolicy:
        factory: Any = self.path_policies.get(name)
        return factory(min_relays=min_relays, max_relays=max_relays)  # type: ignore[no-any-return]

    def cipher_suite(self, name: str) -> CipherSuite:
        return self.cipher_suites.get(name)()

    def ratio_policy(self, name: str) -> RatioPolicy:
        return self.ratio_policies.get(name)()

    # ------------------------------------------------------------------ events
    def notify(self, hookname: str, **kwargs: Any) -> None:
        """Call a lifecycle hook; a failing plugin is logged and the others still run."""
        caller = getattr(self.pm.hook, hookname)
        for impl in reversed(caller.get_hookimpls()):
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception:
                log.exception("plugin %s failed in %s", impl.plugin_name, hookname)

    def implementations(self) -> dict[str, list[str]]:
        """Plugin name -> the hooks it implements (for ``anomos plugins``)."""
        result: dict[str, list[str]] = {}
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = sorted(hc.name for hc in self.pm.get_hookcallers(plugin) or [])
            result[name] = hooks
        return result


def get_plugins(**kwargs: Any) -> Plugins:
    """A fresh :class:`Plugins` facade; see :func:`get_plugin_manager` for arguments."""
    return Plugins(get_plugin_manager(**kwargs))
