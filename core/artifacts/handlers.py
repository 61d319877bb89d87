"""From an adapter's manifest to the handler that hosts it.

One function, :func:`resolve_handler`, used by every place that attaches saved adapters:
the adapter host, a recipe whose ``base_model`` is an adapter folder (``plugtune merge``
goes through it too) and ``plugtune combine``. It finds the tuning method the manifest
names, follows the method to its :class:`~plugtune.kernel.components.AdapterHandler` class
(:func:`~plugtune.kernel.components.handler_class`) and validates the recorded options
against the handler's ``Options``, so all three refuse the same adapters with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugtune.artifacts.adapters import Manifest
from plugtune.kernel.components import ComponentOptions, handler_class
from plugtune.kernel.errors import AdapterError, PluginError, PlugtuneError
from plugtune.kernel.faults import guarded
from plugtune.kernel.registry import Component, PluginSystem


@dataclass(frozen=True)
class HandlerSpec:
    """A manifest's tuning method, its handler class and the options to build it with."""

    method: Component  # the registered tuning method the manifest names
    cls: type  # its AdapterHandler class (shared by every method it hosts)
    options: ComponentOptions

    def build(self) -> Any:
        """A fresh handler instance (a host keeps one per ``cls``), its members guarded so a
        failure inside one names the plugin, its distribution and the member."""
        try:
            handler = self.cls(self.options)
        except PlugtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin failure becomes a named error
            raise PluginError(f"{self.method.plugin.describe()} failed building the handler of tuning method {self.method.name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
        return guarded(handler, self.method)


def resolve_handler(manifest: Manifest, plugins: PluginSystem, *, subject: str) -> HandlerSpec:
    """The handler for the adapter whose manifest is ``manifest``. ``subject`` opens every
    message (``"adapter 'a'"``). Raises :class:`AdapterError` when the method's plugin is
    not installed (naming the plugin's import failure when there was one) or the recorded
    options do not fit the handler."""
    record = manifest.method
    component = plugins.find("method", record.name)
    if component is None:
        dist = f" from distribution {record.distribution} {record.version}".rstrip() if record.distribution else ""
        failure = plugins.failed_plugin_message("method", record.name, plugin=record.plugin or None,
                                                distribution=record.distribution or None)
        if failure:
            raise AdapterError(f"{subject}: {failure}")
        raise AdapterError(f"{subject} was made by tuning method {record.name!r}{dist}, which is not installed; "
                           f"install that plugin (see `plugtune plugins`)")
    cls = handler_class(component.obj)
    fields = cls.Options.model_fields
    try:
        options = cls.Options.model_validate({k: v for k, v in record.options.items() if k in fields})
    except Exception as exc:  # noqa: BLE001 - any validation failure is one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdapterError(f"{subject}: its {record.name} options are invalid ({first})") from None
    return HandlerSpec(component, cls, options)
