pytest_plugins = ["plugtune.testing"]
