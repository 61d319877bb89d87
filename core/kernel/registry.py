"""The plugin manager facade and the component registry.

Built-in plugins and third-party plugins arrive by the same road: entry points in the group
``plugtune`` (plugtune's own ``pyproject.toml`` declares the built-ins there). Each entry
point is imported inside its own ``try``; a failure becomes a one-line warning naming the
entry point and its distribution, and every other plugin keeps working. Set
``PLUGTUNE_STRICT_PLUGINS=1`` to make such failures errors, and
``PLUGTUNE_DISABLE_PLUGINS=name,name`` to skip entry points (or distributions) by name.

Entry points are the only road: the built-ins too are read from the installed ``plugtune``
distribution's metadata. A source tree that was never installed has none, and says so
(``pip install -e .``) instead of quietly working from a second list.

A plugin that failed to import is remembered (:class:`FailedPlugin`), so that a recipe or an
adapter naming one of its components hears that its plugin is broken, not that the name is
unknown (:meth:`PluginSystem.failed_plugin_message`).

Registration hooks are called one implementation at a time (not through a single pluggy
call) so that a plugin that raises while registering, or registers a name someone else
already has, is identified and skipped without losing the others.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from plugtune.kernel import hookspecs
from plugtune.kernel.errors import PluginError

KINDS: dict[str, str] = {
    # kind -> registration hook
    "method": "register_tuning_methods",
    "loader": "register_data_loaders",
    "regularizer": "register_regularizers",
    "evaluator": "register_evaluators",
    "task": "register_tasks",
    "model": "register_base_models",
    "tracker": "register_trackers",
}
KIND_LABELS = {
    "method": "tuning method",
    "loader": "data loader",
    "regularizer": "regularizer",
    "evaluator": "evaluator",
    "task": "task",
    "model": "base model alias",
    "tracker": "tracker",
}

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its entry-point name, module and distribution."""

    name: str
    module: str
    distribution: str
    version: str
    builtin: bool

    def describe(self) -> str:
        """``plugin 'x' (distribution d 1.0)``: how every message names a plugin."""
        return describe_plugin(self.name, self.distribution, self.version)


@dataclass(frozen=True)
class FailedPlugin:
    """An entry point that could not be imported: what it is and why it failed. Its
    components are unknown (they register only once the module imports); its entry-point
    name and distribution are what a recipe or an adapter manifest can be matched against."""

    name: str
    distribution: str
    version: str
    error: str

    def describe(self) -> str:
        return describe_plugin(self.name, self.distribution, self.version)


@dataclass(frozen=True)
class Component:
    """A registered component and where it came from."""

    kind: str
    name: str
    obj: Any
    plugin: PluginInfo

    @property
    def options_model(self) -> Any:
        return getattr(self.obj, "Options", None)


@dataclass
class PluginSystem:
    """The loaded plugins, their problems, and the component registry."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    components: dict[str, dict[str, Component]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    strict: bool = False
    failed: list[FailedPlugin] = field(default_factory=list)

    # -- lookup -------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self.components.get(kind, {}))

    def get(self, kind: str, name: str) -> Component:
        try:
            return self.components[kind][name]
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        """Why ``name`` is not a registered ``kind``: its plugin failed to import (when a
        failed entry point has that name), else unknown with a did-you-mean, naming any
        plugin that failed to import and so may have provided it."""
        failed = self.failed_plugin_message(kind, name, plugin=name)
        if failed:
            return failed
        message = unknown_name_message(kind, name, self.names(kind))
        if self.failed:
            broken = ", ".join(f"{f.describe()}: {f.error}" for f in self.failed)
            message += f"; plugins that failed to import and may provide it: {broken}"
        return message

    def failed_plugin_message(self, kind: str, name: str, *, plugin: str | None = None,
                              distribution: str | None = None) -> str | None:
        """A one-line message when ``name`` (a ``kind``) would have come from a plugin that
        failed to import, matched by entry-point name ``plugin`` or by ``distribution`` (an
        adapter manifest records both: ``method.plugin``, ``method.distribution``); None when
        no failed plugin matches. For the host's adapter load and for recipes."""
        for failed in self.failed:
            if (plugin is not None and failed.name.lower() == plugin.lower()) or \
                    (distribution is not None and failed.distribution.lower() == distribution.lower()):
                label = KIND_LABELS.get(kind, kind)
                return (f"{label} {name!r} comes from {failed.describe()}, which failed to import: {failed.error}; "
                        f"fix or reinstall that distribution")
        return None

    def find(self, kind: str, name: str) -> Component | None:
        return self.components.get(kind, {}).get(name)

    # -- problems -----------------------------------------------------------------------

    def _problem(self, message: str) -> None:
        if self.strict:
            raise PluginError(message + " (PLUGTUNE_STRICT_PLUGINS=1)")
        self.problems.append(message)
        print(f"warning: {message}", file=sys.stderr)

    # -- lifecycle hooks ----------------------------------------------------------------

    def call_lifecycle(self, hook: str, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin, naming the plugin if one raises."""
        caller = getattr(self.pm.hook, hook)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's own order: last in, first out
            self.call_one(impl, hook, kwargs)

    def call_one(self, impl: Any, hook: str, kwargs: dict[str, Any]) -> None:
        """One plugin's implementation of a lifecycle hook, with the arguments it names; a
        failure becomes a :class:`PluginError` naming the plugin and the hook."""
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        try:
            impl.function(**args)
        except Exception as exc:  # noqa: BLE001 - any plugin failure becomes a named error
            info = self.plugins.get(impl.plugin_name)
            who = info.describe() if info else f"plugin {impl.plugin_name!r}"
            raise PluginError(f"{who} failed in hook {hook}: {type(exc).__name__}: {exc}") from exc


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    label = KIND_LABELS.get(kind, kind)
    hint = did_you_mean(name, known)
    installed = ", ".join(known) if known else "none"
    return f"unknown {label} {name!r}{hint} (installed: {installed})"


def did_you_mean(name: str, known: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known``, ignoring case (``IA3`` finds
    ``ia3``), or an empty string."""
    by_lower: dict[str, str] = {}
    for k in known:
        by_lower.setdefault(str(k).lower(), k)
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def describe_plugin(name: str, distribution: str, version: str = "") -> str:
    """``plugin 'x' (distribution d 1.0)``: one wording for every message about a plugin."""
    return f"plugin {name!r} (distribution {f'{distribution} {version}'.strip()})"


NOT_INSTALLED = ("plugtune's built-in plugins were not found: no installed 'plugtune' distribution declares "
                 "entry points in the 'plugtune' group (running from a source tree that was never installed?); "
                 "install it with: pip install -e .")


def _entry_points() -> Iterator[tuple[str, Callable[[], ModuleType], str, str]]:
    """Yield (entry point name, loader, distribution, version), built-ins first."""
    eps = list(md.entry_points(group=hookspecs.PROJECT))
    eps.sort(key=lambda ep: (ep.dist is None or ep.dist.name != "plugtune", ep.name))
    for ep in eps:
        dist = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "?"
        yield ep.name, ep.load, dist, version


def build_plugin_system(extra_plugins: list[tuple[str, Any]] | None = None) -> PluginSystem:
    """Load every plugin and build the registry. ``extra_plugins`` (name, module-or-object)
    are registered after the entry points, the way tests and embedding code add plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    system = PluginSystem(pm=pm, strict=_env_flag("PLUGTUNE_STRICT_PLUGINS"))
    disabled = {s.strip() for s in os.environ.get("PLUGTUNE_DISABLE_PLUGINS", "").split(",") if s.strip()}

    candidates: list[tuple[PluginInfo, Callable[[], Any]]] = []
    entry_points = list(_entry_points())
    if not any(dist == "plugtune" for _, _, dist, _ in entry_points):
        system._problem(NOT_INSTALLED)
    for name, load, dist, version in entry_points:
        if name in disabled or dist in disabled:
            continue
        info = PluginInfo(name=name, module="", distribution=dist, version=version, builtin=dist == "plugtune")
        candidates.append((info, load))
    for name, obj in extra_plugins or []:
        info = PluginInfo(name=name, module="", distribution="(registered in code)", version="", builtin=False)
        candidates.append((info, lambda o=obj: o))

    for info, load in candidates:
        try:
            plugin = load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the tool
            system.failed.append(FailedPlugin(info.name, info.distribution, info.version, f"{type(exc).__name__}: {exc}"))
            system._problem(
                f"{info.describe()} failed to import: {type(exc).__name__}: {exc}"
            )
            continue
        module = getattr(plugin, "__name__", type(plugin).__name__)
        info = PluginInfo(info.name, module, info.distribution, info.version, info.builtin)
        if info.name in system.plugins:
            system._problem(f"{info.describe()} has the same name as an already loaded plugin; skipped")
            continue
        try:
            pm.register(plugin, name=info.name)
        except Exception as exc:  # noqa: BLE001 - e.g. a hookimpl with a wrong signature
            system._problem(f"{info.describe()} could not be registered: {exc}")
            continue
        system.plugins[info.name] = info

    while True:  # check_pending reports one bad plugin at a time; drop each, keep the rest
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            # A function marked @hookimpl whose name matches no hookspec: almost always a typo.
            plugin_name = pm.get_name(exc.plugin) if exc.plugin is not None else "?"
            info = system.plugins.get(plugin_name)
            who = info.describe() if info else f"plugin {plugin_name!r}"
            system._problem(f"{who}: {exc}")
            if exc.plugin is None:
                break
            pm.unregister(exc.plugin)
            system.plugins.pop(plugin_name, None)

    for kind, hook in KINDS.items():
        system.components[kind] = {}
        for impl in getattr(pm.hook, hook).get_hookimpls():  # registration order: built-ins first, first name wins
            _collect(system, kind, hook, impl)
    return system


def _collect(system: PluginSystem, kind: str, hook: str, impl: Any) -> None:
    info = system.plugins[impl.plugin_name]
    table = system.components[kind]
    pending: dict[str, Component] = {}

    def register(name: str, obj: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"component names are non-empty strings, got {name!r}")
        if name in table or name in pending:
            other = (table.get(name) or pending[name]).plugin
            system._problem(
                f"{info.describe()} registers {KIND_LABELS[kind]} {name!r}, "
                f"which {other.describe()} already registered; kept the first"
            )
            return
        pending[name] = Component(kind=kind, name=name, obj=obj, plugin=info)

    try:
        impl.function(**({"register": register} if "register" in impl.argnames else {}))
    except Exception as exc:  # noqa: BLE001
        system._problem(f"{info.describe()} failed in hook {hook}: {type(exc).__name__}: {exc}")
        return
    table.update(pending)


_SYSTEM: PluginSystem | None = None


def get_plugin_system() -> PluginSystem:
    """The process-wide plugin system, built on first use."""
    global _SYSTEM
    if _SYSTEM is None:
        _SYSTEM = build_plugin_system()
    return _SYSTEM


def set_plugin_system(system: PluginSystem | None) -> None:
    """Replace (or with ``None``, reset) the process-wide plugin system. For tests and for
    programs that register plugins in code."""
    global _SYSTEM
    _SYSTEM = system
