"""Artifacts: what a run leaves on disk and what it starts from.

``adapters`` (the one adapter format: safetensors + config + manifest), ``models`` (base
models, aliases, fingerprints), ``combine`` (adapters combined into one), ``synthetic``
(random adapters for benchmarks and tests). Imports the kernel and data layers.
"""
