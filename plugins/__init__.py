"""Built-in plugins. Each module is a plugin of its own, declared as an entry point in the
``plugtune`` group of plugtune's ``pyproject.toml`` and loaded exactly like a third-party
plugin. Nothing in the core refers to these modules by name."""
