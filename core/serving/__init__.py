"""Serving: one base, many adapters.

``host`` (:class:`AdapterHost`: load, switch, mix rows, merge, unload), ``decoding`` (the
KV-cached decode loop), ``server`` (``plugtune serve``'s HTTP API). Imports the kernel, data
and artifacts layers; never training.
"""
