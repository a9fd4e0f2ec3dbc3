"""Built-in plugins. Each module is a plugin exactly as a third party writes one."""
