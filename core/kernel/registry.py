"""The plugin manager facade and the component registry.

Built-in plugins and third-party plugins arrive by the same road: entry points in the group
``plugtune`` (plugtune's own ``pyproject.toml`` declares the built-ins there). Each entry
point is imported inside its own ``try``; a failure becomes a one-line warning naming the
entry point and its distribution, and every other plugin keeps working. Set
``PLUGTUNE_STRICT_PLUGINS=1`` to make such failures errors, and
``PLUGTUNE_DISABLE_PLUGINS=name,name`` to skip entry points (or distributions) by name.

Registration hooks are called one implementation at a time (not through a single pluggy
call) so that a plugin that raises while registering, or registers a name someone else
already has, is identified and skipped without losing the others.
"""

from __future__ import annotations

import difflib
import importlib
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
}
KIND_LABELS = {
    "method": "tuning method",
    "loader": "data loader",
    "regularizer": "regularizer",
    "evaluator": "evaluator",
    "task": "task",
    "model": "base model alias",
}

# Used only when plugtune runs from a source tree that was never installed, so that no entry
# point metadata exists. Mirrors [project.entry-points.plugtune] in pyproject.toml.
_BUILTIN_FALLBACK = {
    "builtin_models": "plugtune.plugins.models.builtin",
    "lora": "plugtune.plugins.methods.lora",
    "full": "plugtune.plugins.methods.full",
    "int8": "plugtune.plugins.methods.int8",
    "prefix": "plugtune.plugins.methods.prefix",
    "table": "plugtune.plugins.loaders.table",
    "weight_decay": "plugtune.plugins.regularizers.weight_decay",
    "training_regularizers": "plugtune.plugins.regularizers.training",
    "augmentation": "plugtune.plugins.regularizers.augmentation",
    "counterfactual": "plugtune.plugins.evaluators.counterfactual",
    "text_metrics": "plugtune.plugins.evaluators.text",
    "text_loader": "plugtune.plugins.loaders.text",
    "classification_metrics": "plugtune.plugins.evaluators.classification",
    "language_model_metrics": "plugtune.plugins.evaluators.language_model",
    "causal_lm": "plugtune.plugins.tasks.causal_lm",
    "sequence_classification": "plugtune.plugins.tasks.sequence_classification",
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

    # -- lookup -------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self.components.get(kind, {}))

    def get(self, kind: str, name: str) -> Component:
        try:
            return self.components[kind][name]
        except KeyError:
            raise PluginError(unknown_name_message(kind, name, self.names(kind))) from None

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
            args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
            try:
                impl.function(**args)
            except Exception as exc:  # noqa: BLE001 - any plugin failure becomes a named error
                info = self.plugins.get(impl.plugin_name)
                who = _describe(info) if info else repr(impl.plugin_name)
                raise PluginError(f"plugin {who} failed in hook {hook}: {type(exc).__name__}: {exc}") from exc


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    label = KIND_LABELS.get(kind, kind)
    hint = did_you_mean(name, known)
    installed = ", ".join(known) if known else "none"
    return f"unknown {label} {name!r}{hint} (installed: {installed})"


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(info: PluginInfo) -> str:
    return f"{info.name!r} (distribution {f'{info.distribution} {info.version}'.strip()})"


def _entry_points() -> Iterator[tuple[str, Callable[[], ModuleType], str, str]]:
    """Yield (entry point name, loader, distribution, version), built-ins first."""
    eps = list(md.entry_points(group=hookspecs.PROJECT))
    if not any(ep.dist and ep.dist.name == "plugtune" for ep in eps):
        from plugtune import __version__

        for name, module in _BUILTIN_FALLBACK.items():
            yield name, (lambda m=module: importlib.import_module(m)), "plugtune", __version__
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
    for name, load, dist, version in _entry_points():
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
            system._problem(
                f"plugin {_describe(info)} failed to import: {type(exc).__name__}: {exc}"
            )
            continue
        module = getattr(plugin, "__name__", type(plugin).__name__)
        info = PluginInfo(info.name, module, info.distribution, info.version, info.builtin)
        if info.name in system.plugins:
            system._problem(f"plugin {_describe(info)} has the same name as an already loaded plugin; skipped")
            continue
        try:
            pm.register(plugin, name=info.name)
        except Exception as exc:  # noqa: BLE001 - e.g. a hookimpl with a wrong signature
            system._problem(f"plugin {_describe(info)} could not be registered: {exc}")
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
            who = _describe(info) if info else repr(plugin_name)
            system._problem(f"plugin {who}: {exc}")
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
                f"plugin {_describe(info)} registers {KIND_LABELS[kind]} {name!r}, "
                f"which plugin {_describe(other)} already registered; kept the first"
            )
            return
        pending[name] = Component(kind=kind, name=name, obj=obj, plugin=info)

    try:
        impl.function(**({"register": register} if "register" in impl.argnames else {}))
    except Exception as exc:  # noqa: BLE001
        system._problem(f"plugin {_describe(info)} failed in hook {hook}: {type(exc).__name__}: {exc}")
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
