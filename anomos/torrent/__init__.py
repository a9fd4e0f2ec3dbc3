"""The BitTorrent layer: metainfo, storage, piece picking, peer wire; no sockets."""
