"""Training: ``plugtune run`` from recipe to adapter.

``recipe`` (validation before anything loads), ``train`` (the run, in phases), ``loss``
(logits at label positions), ``evaluation``, ``checkpoints`` and ``signals`` (exact resume),
``launch`` (data-parallel processes), ``runtime`` (threads, precision, attention). Imports
the kernel, data and artifacts layers; never serving.
"""
