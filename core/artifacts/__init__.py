"""Artifacts: what a run leaves on disk and what it starts from.

``adapters`` (the one adapter format: safetensors + config + manifest), ``models`` (base
models, aliases, fingerprints), ``handlers`` (a manifest to the handler that hosts it),
``combine`` (adapters combined into one, by any handler that can). Imports the kernel and
data layers.
"""
