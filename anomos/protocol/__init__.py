"""Pure wire formats: link frames, onions (tracking codes), end-to-end cells. No sockets."""
