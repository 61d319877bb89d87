"""Every hook plugtune calls, in one file.

A plugin is a module (or object) with functions decorated by :data:`plugtune.hookimpl` whose
names match the specs below. Hooks are always called with keyword arguments, so an
implementation may accept any subset of a spec's parameters, in any order. pluggy does not
pass defaults or ``**kwargs``: name the parameters you want.

Call order among plugins is last-registered-first; use ``@hookimpl(tryfirst=True)`` or
``trylast=True`` to change it, never import order.

Two families:

* **Registration hooks** (``register_*``) run once per process, when the registry is first
  built. Each receives a ``register(name, component)`` callback. The core owns the registry:
  it rejects duplicate names, records which plugin and distribution supplied each component,
  and recipes refer to components by these names only. A component is a class with an
  ``Options`` pydantic model (the recipe block it accepts) and the protocol of its kind in
  :mod:`plugtune.kernel.components`.
* **Lifecycle hooks** (``on_*``) run during ``plugtune run`` for cross-cutting plugins:
  metric loggers, notifications, custom checkpoints. Their return values are ignored. An
  exception in one stops the run with an error naming the plugin and the hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from plugtune.kernel.components import BaseModelAlias, DataLoader, Evaluator, Regularizer, Task, Tracker, TuningMethod
    from plugtune.training.train import RunState

PROJECT = "plugtune"  # the hook marker name, the entry-point group and the import package

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Any], None]
"""``register(name, component)``: what every registration hook receives. Typed per kind below:
each kind registers a class (its protocol in :mod:`plugtune.kernel.components`), aliases an
object with ``locate()``."""
RegisterMethods = Callable[[str, "type[TuningMethod]"], None]
RegisterLoaders = Callable[[str, "type[DataLoader]"], None]
RegisterRegularizers = Callable[[str, "type[Regularizer]"], None]
RegisterEvaluators = Callable[[str, "type[Evaluator]"], None]
RegisterTasks = Callable[[str, "type[Task]"], None]
RegisterAliases = Callable[[str, "BaseModelAlias"], None]
RegisterTrackers = Callable[[str, "type[Tracker]"], None]


# --------------------------------------------------------------------------------------------
# Registration: the six component kinds, plus base-model aliases
# --------------------------------------------------------------------------------------------


@hookspec
def register_tuning_methods(register: RegisterMethods) -> None:
    """Register tuning methods: ``register("lora", LoraMethod)``.

    Called once, when the registry is built. A tuning method turns a base model into a
    trainable one and back into a saved adapter (:class:`plugtune.kernel.components.TuningMethod`);
    its ``handler`` attaches saved adapters to a resident base for inference
    (:class:`plugtune.kernel.components.AdapterHandler`). Returns nothing.
    """


@hookspec
def register_data_loaders(register: RegisterLoaders) -> None:
    """Register data loaders: ``register("table", TableLoader)``.

    Called once, when the registry is built. A loader reads a source named in a recipe's
    ``data`` block and yields plain example dicts per split (see
    :class:`plugtune.kernel.components.DataLoader`). Returns nothing.
    """


@hookspec
def register_regularizers(register: RegisterRegularizers) -> None:
    """Register regularizers: ``register("weight_decay", WeightDecay)``.

    Called once, when the registry is built. A regularizer may act on the optimizer's
    parameter groups, on each training batch, on the loss and on the gradients, and reports
    what it did each step (see :class:`plugtune.kernel.components.Regularizer`). Returns nothing.
    """


@hookspec
def register_evaluators(register: RegisterEvaluators) -> None:
    """Register evaluators: ``register("accuracy", Accuracy)``.

    Called once, when the registry is built. An evaluator accumulates over the evaluation
    batches of a split and returns named metrics (see
    :class:`plugtune.kernel.components.Evaluator`). Returns nothing.
    """


@hookspec
def register_tasks(register: RegisterTasks) -> None:
    """Register tasks: ``register("causal-lm", CausalLm)``.

    Called once, when the registry is built. A task says how a recipe's examples become
    model inputs and labels, which model head they train, and how the model's outputs become
    predictions; a recipe picks one with ``task: {type: NAME, ...}`` and adapters record it
    in their manifest (see :class:`plugtune.kernel.components.Task`). Returns nothing.
    """


@hookspec
def register_trackers(register: RegisterTrackers) -> None:
    """Register experiment trackers: ``register("tensorboard", TensorBoardTracker)``.

    Called once, when the registry is built. A recipe picks trackers by name in its
    ``tracking:`` list; during ``plugtune run`` each chosen tracker is built from its options
    and registered as a lifecycle plugin for that run only, on the main process (see
    :class:`plugtune.kernel.components.Tracker`). Returns nothing.
    """


@hookspec
def register_base_models(register: RegisterAliases) -> None:
    """Register base-model aliases: ``register("smollm2-135m", BaseModelAlias(...))``.

    Called once, when the registry is built. An alias lets a recipe say ``base_model:
    smollm2-135m`` instead of a path; the component knows how to find (and, if needed,
    fetch and cache) the weights offline (see :class:`plugtune.kernel.components.BaseModelAlias`).
    Returns nothing.
    """


# --------------------------------------------------------------------------------------------
# Lifecycle of `plugtune run`
# --------------------------------------------------------------------------------------------


@hookspec
def on_train_start(run: RunState) -> None:
    """Called once after the model is prepared and before the first step.

    ``run`` exposes the validated recipe, the prepared model, the run directory and the step
    counters. Return value ignored.
    """


@hookspec
def on_step_end(run: RunState, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step with that step's logged metrics (loss, learning
    rate, tokens/s and each regularizer's term). Return value ignored."""


@hookspec
def on_evaluate(run: RunState, split: str, step: int, metrics: dict[str, float]) -> None:
    """Called after every evaluation pass (before training, at the eval cadence, and after
    training) with the evaluators' metrics for ``split``. Return value ignored."""


@hookspec
def on_train_end(run: RunState, adapter_dir: str, metrics: dict[str, float]) -> None:
    """Called once after the adapter has been saved, with its directory and the final
    evaluation metrics. Return value ignored."""


@hookspec
def on_train_failed(run: RunState, error: BaseException, interrupted: bool) -> None:
    """Called once when a run stops with an error after ``on_train_start`` (a failed step, a
    failed save, a plugin that raised), or is interrupted (Ctrl-C, SIGTERM: ``interrupted``
    is True; a checkpoint may have been saved and ``--resume`` continues). ``on_train_end``
    is then never called. For plugins holding something open for the run (a tracker's run,
    a file, a connection) to close it with the right status. The run's own error is what
    the user sees: an exception raised here is printed as a warning and does not replace
    it. Return value ignored."""
