"""Data: how examples become token rows and batches.

``tasks`` (the task machinery: templates, collation), ``labels`` (label positions and the
evaluation rows built there), ``encoding`` (a split encoded), ``batching`` (length-grouped
batch order), ``datacheck`` (refusals before training), ``tokenized_cache``. Imports only the
kernel.
"""
