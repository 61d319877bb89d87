"""Plugin components that raise become one-line errors naming the plugin and the member.

Lifecycle hooks are already called through :meth:`PluginSystem.call_lifecycle`, which names
the failing plugin. Components (tuning methods and their host-side handlers, regularizers,
evaluators) are objects whose methods the core calls directly; :func:`guarded` makes any
exception other than a :class:`~plugtune.kernel.errors.PlugtuneError` from one of their
methods a :class:`~plugtune.kernel.errors.PluginError` like ``plugin 'x' (distribution d
1.0) failed in regularizer 'noisy' (transform_batch): RuntimeError: ...``.

The component itself is returned, its public methods replaced on the instance by guarded
ones (each keeps its signature, ``functools.wraps``). So it stays an instance of its own
class: ``hasattr(reg, "loss_term")``, ``isinstance(handler, Folds)`` (which Python 3.12
answers from the class) and identity checks all see the real object.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from plugtune.kernel.errors import PluginError, PlugtuneError
from plugtune.kernel.registry import KIND_LABELS, Component

GUARDED = "__plugtune_guarded__"  # set on a component whose methods are already guarded


def _guard(function: Any, member: str, registered: Component) -> Any:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PlugtuneError:
            raise
        except Exception as exc:  # any plugin failure becomes a named error
            label = KIND_LABELS.get(registered.kind, registered.kind)
            raise PluginError(f"{registered.plugin.describe()} failed in {label} {registered.name!r} ({member}): "
                              f"{type(exc).__name__}: {exc}") from exc

    return call


def guarded(component: Any, registered: Component) -> Any:
    """``component`` with its public methods reporting failures as :class:`PluginError`
    naming ``registered``'s plugin (see the module doc); returns the same object."""
    if getattr(component, GUARDED, False):
        return component
    for member, value in inspect.getmembers(type(component)):
        if member.startswith("_") or isinstance(value, (type, property)) or not callable(value):
            continue
        bound = getattr(component, member)
        if callable(bound):
            setattr(component, member, _guard(bound, member, registered))
    setattr(component, GUARDED, True)
    return component
