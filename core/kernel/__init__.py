"""The kernel: what every other layer stands on.

``hookspecs`` (every hook), ``components`` (every protocol and capability a plugin
implements), ``registry`` (plugins loaded from entry points, components by name), ``errors``
(user-facing exceptions), ``faults`` (plugin failures named), ``paths`` (caches). The kernel
imports nothing of plugtune's outside itself.
"""
