"""Built-in ratio plugins."""
