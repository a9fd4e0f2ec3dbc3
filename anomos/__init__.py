"""anomos: anonymous peer-to-peer file sharing derived from BitTorrent.

The core only defines hooks (:mod:`anomos.hookspecs`); every transport, path
policy, cipher suite, ratio policy and CLI command is a plugin.
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "anomos"

#: Marks a function or method as an implementation of an ``anomos_*`` hook.
hookimpl = pluggy.HookimplMarker(PROJECT)
#: Marks a function in :mod:`anomos.hookspecs` as a hook specification.
hookspec = pluggy.HookspecMarker(PROJECT)

__all__ = ["PROJECT", "__version__", "hookimpl", "hookspec"]
