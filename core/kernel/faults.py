"""Plugin components that raise become one-line errors naming the plugin and the hook.

Lifecycle hooks are already called through :meth:`PluginSystem.call_lifecycle`, which names
the failing plugin. Components (regularizers, evaluators) are objects whose methods the core
calls directly; :func:`guarded` wraps one so that any exception other than a
:class:`~plugtune.kernel.errors.PlugtuneError` from one of its methods becomes a
:class:`~plugtune.kernel.errors.PluginError` like ``plugin 'x' (distribution d 1.0) failed in
regularizer 'noisy' (transform_batch): RuntimeError: ...``. The wrapper exposes exactly the
attributes the component has, so ``hasattr(reg, "loss_term")`` checks keep working.
"""

from __future__ import annotations

import functools
from typing import Any

from plugtune.kernel.errors import PluginError, PlugtuneError
from plugtune.kernel.registry import KIND_LABELS, Component


class GuardedComponent:
    """A component whose method calls report failures as :class:`PluginError`."""

    def __init__(self, component: Any, registered: Component) -> None:
        self.wrapped_component = component
        self._registered = registered

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.wrapped_component, name)
        if name.startswith("_") or not callable(value) or isinstance(value, type):
            return value
        registered = self._registered

        @functools.wraps(value)  # keeps the member's signature for callers that inspect it (call_prepare)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except PlugtuneError:
                raise
            except Exception as exc:  # any plugin failure becomes a named error
                info = registered.plugin
                who = f"{info.name!r} (distribution {f'{info.distribution} {info.version}'.strip()})"
                label = KIND_LABELS.get(registered.kind, registered.kind)
                raise PluginError(f"plugin {who} failed in {label} {registered.name!r} ({name}): "
                                  f"{type(exc).__name__}: {exc}") from exc

        return call


def guarded(component: Any, registered: Component) -> Any:
    """``component`` wrapped so its failures name ``registered``'s plugin (see the module doc)."""
    return GuardedComponent(component, registered)
