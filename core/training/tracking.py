"""The recipe's trackers (``tracking:``) attached to one run as lifecycle plugins.

A tracker is a component (registered with ``register_trackers``, see
:class:`~plugtune.kernel.components.Tracker`) whose instance is a pluggy plugin: while a run
lasts, :func:`tracked` registers one instance per ``tracking`` entry with the run's plugin
manager, so each receives ``on_train_start`` ... ``on_train_end`` like a module-level plugin,
and unregisters them when the run ends, however it ends. Only the main process of a
data-parallel run attaches them: the others would log the same run again.

A run that raises inside the block (a failed step or save, a plugin error, Ctrl-C) calls
``on_train_failed(run, error, interrupted)`` on every plugin before the error goes on, so a
tracker closes its run with a failed or killed status instead of leaving it "running".
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from plugtune.kernel.errors import PluginError, PlugtuneError
from plugtune.kernel.registry import PluginInfo, PluginSystem
from plugtune.training.signals import Interrupted

if TYPE_CHECKING:
    from plugtune.training.recipe import Recipe
    from plugtune.training.train import RunState


def tracker_plugin_name(index: int, name: str) -> str:
    """The plugin name a tracker instance is registered under: ``tracking[0]:mlflow``, so an
    error in one of its hooks names the recipe entry it came from."""
    return f"tracking[{index}]:{name}"


@contextmanager
def tracked(recipe: Recipe, plugins: PluginSystem, state: RunState, *, main: bool) -> Iterator[list[Any]]:
    """Build and register the recipe's trackers for the block (on the main process only);
    on an exception call ``on_train_failed`` on every plugin, then re-raise; always
    unregister the trackers. Yields the tracker instances."""
    attached: list[tuple[str, Any]] = []
    try:
        if main:
            for i, bound in enumerate(recipe.trackers):
                attached.append(_attach(plugins, tracker_plugin_name(i, bound.name), bound))
        yield [tracker for _, tracker in attached]
    except BaseException as error:
        _report_failure(plugins, state, error)
        raise
    finally:
        for name, tracker in attached:
            if plugins.pm.is_registered(tracker):
                plugins.pm.unregister(tracker)
            plugins.plugins.pop(name, None)


def _attach(plugins: PluginSystem, name: str, bound: Any) -> tuple[str, Any]:
    """Build one tracker and register it as a plugin named ``name``, recorded with the
    distribution of the plugin that registered the tracker, so a hook that raises is named
    ``plugin 'tracking[0]:x' (distribution d 1.0) failed in hook ...``. Its methods are not
    wrapped by :func:`~plugtune.kernel.faults.guarded`: pluggy calls them, and
    ``call_lifecycle`` already names the failing plugin."""
    origin = bound.component.plugin
    try:
        tracker = bound.build()
        plugins.pm.register(tracker, name=name)
    except PlugtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tracker that cannot start is named, not a traceback
        raise PluginError(f"{origin.describe()} failed to start tracker {name}: {type(exc).__name__}: {exc}") from exc
    plugins.plugins[name] = PluginInfo(name, type(tracker).__module__, origin.distribution, origin.version, origin.builtin)
    return name, tracker


def _report_failure(plugins: PluginSystem, state: RunState, error: BaseException) -> None:
    """``on_train_failed`` on every plugin; one that raises there is a warning on stderr, never
    a replacement for the run's own error (the one the user must see)."""
    interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
    caller = plugins.pm.hook.on_train_failed
    for impl in reversed(caller.get_hookimpls()):
        kwargs = {"run": state, "error": error, "interrupted": interrupted}
        try:
            plugins.call_one(impl, "on_train_failed", kwargs)
        except PluginError as exc:
            print(f"warning: {exc}", file=sys.stderr)
