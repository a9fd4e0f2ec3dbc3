"""Built-in ciphers plugins."""
