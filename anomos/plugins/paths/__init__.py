"""Built-in paths plugins."""
