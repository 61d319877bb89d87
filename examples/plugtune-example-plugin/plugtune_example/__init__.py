"""An example third-party plugtune plugin (see :mod:`plugtune_example.plugin`)."""

__version__ = "0.1.0"
