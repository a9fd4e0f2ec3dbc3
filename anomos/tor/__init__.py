"""Tor support: ControlPort access, v3 onion services, and a private offline test network.

* :mod:`anomos.tor.control` connects to (or launches) a tor and finds its SOCKS port;
* :mod:`anomos.tor.onion` publishes a local port as a v3 onion service whose key
  survives restarts, with optional v3 client authorization;
* :mod:`anomos.tor.testnet` runs a whole private Tor network on loopback, so the
  Tor paths of anomos are tested without the internet.

The ``tor`` and ``socks5`` transports live in :mod:`anomos.plugins.transports`.
This package's own namespace holds only the constants their options show, so
that a peer without Tor never imports stem (a few hundred ms at every launch).
"""

#: Where a system tor usually listens for controllers (Debian: also ``unix:/run/tor/control``).
DEFAULT_CONTROL = "127.0.0.1:9051"
#: Seconds for a whole private test network (all attempts) to be ready.
TESTNET_START_TIMEOUT = 150.0
