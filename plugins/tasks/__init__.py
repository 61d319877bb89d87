"""Built-in tasks: ``causal-lm``, ``chat`` and ``sequence-classification``, each its own entry point
in the ``plugtune`` group, registered through ``register_tasks`` like a third-party task."""
