"""anomos daemon: one peer, many torrents, driven over the Transmission RPC."""
