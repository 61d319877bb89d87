"""The plugin SDK: the one module a plugin imports.

    from plugtune.sdk import hookimpl, ComponentOptions, TuningMethod, AdapterHandler, ...

Everything a component of any kind receives, returns or may declare is here: the hook
marker, every protocol and optional capability (:mod:`plugtune.kernel.components`), the
``Task`` a component receives and the helpers task plugins share, the training batch format
(``IGNORE_INDEX``, label positions), the evaluation records, ``DataPath`` for path options,
``PackagedModel`` for base-model aliases, the adapter read from disk (for ``combine``), the
layer-wrapper helpers a host handler uses, and the user-facing errors. ``docs/plugins.md``
explains each; a test keeps that guide and this contract in step.

Importing this module is cheap (no torch): names from the heavier layers are loaded on
first use, so registering plugins and ``plugtune validate`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from plugtune.kernel.components import (
    AdapterHandler,
    BaseLoading,
    MemoryHints,
    BaseModelAlias,
    ChecksModel,
    ComputesLoss,
    ReferenceMode,
    RendersChat,
    ScoresTexts,
    Combined,
    Combines,
    ComponentOptions,
    ExportsLora,
    PlainLora,
    DataLoader,
    DataFileOrFolder,
    DataPath,
    Decision,
    Direction,
    EvalBatch,
    EvalContext,
    EvalMetrics,
    Evaluator,
    Example,
    Folds,
    Head,
    Merges,
    MetricDirections,
    MixesRows,
    NoOptions,
    PrepareContext,
    Regularizer,
    ReportsResidentBytes,
    RowStream,
    StartsDecoding,
    Task,
    TaskLoss,
    Tracker,
    TuningMethod,
    FiniteScalars,
    flatten_params,
    mixes_rows,
    not_regular,
    open_regular,
    original_module,
    remove_wrapper,
    replace_module,
    beneath_wrappers,
)
from plugtune.kernel.errors import (
    AdapterError,
    DataError,
    ModelError,
    PluginError,
    PlugtuneError,
    RecipeError,
    TrainingError,
)
from plugtune.kernel.paths import plugtune_home
from plugtune.kernel.registry import did_you_mean
from plugtune.kernel.hookspecs import (
    Register,
    RegisterAliases,
    RegisterEvaluators,
    RegisterLoaders,
    RegisterMethods,
    RegisterRegularizers,
    RegisterTasks,
    RegisterTrackers,
    hookimpl,
)

# name -> module, imported when the name is first used (these modules import torch or
# transformers, or sit in layers above the kernel)
_LAZY = {
    # helpers task plugins share (core/data/tasks.py, core/data/labels.py)
    "IGNORE_INDEX": "plugtune.data.labels",
    "LabelPositions": "plugtune.data.labels",
    "eval_batch_from_label_logits": "plugtune.data.labels",
    "per_example_loss": "plugtune.data.labels",
    "Template": "plugtune.data.tasks",
    "Labels": "plugtune.data.tasks",
    "LabelWords": "plugtune.data.tasks",
    "check_template": "plugtune.data.tasks",
    "collate": "plugtune.data.tasks",
    "fill": "plugtune.data.tasks",
    "fill_one": "plugtune.data.tasks",
    "natural_key": "plugtune.data.tasks",
    "template_fields": "plugtune.data.tasks",
    "build_task": "plugtune.data.tasks",
    # conversations: formats, chat templates, masks by offsets (core/data/conversations.py)
    **{name: "plugtune.data.conversations" for name in (
        "BUILTIN_TEMPLATES", "ChatTemplate", "Message", "Span", "check_messages", "describe_formats",
        "cut_points", "detect_format", "format_keys", "to_messages", "token_mask", "tokenize_pieces", "tokenize_with_offsets")},
    # sequence log-probabilities for tasks that compute their own loss (core/training/loss.py)
    "answer_log_probs": "plugtune.training.loss",
    # artifacts
    "Adapter": "plugtune.artifacts.adapters",
    "PackagedModel": "plugtune.artifacts.models",
    "ModelOutline": "plugtune.artifacts.outline",
    # what lifecycle hooks receive
    "RunState": "plugtune.training.train",
}

if TYPE_CHECKING:
    from plugtune.artifacts.adapters import Adapter
    from plugtune.artifacts.models import PackagedModel
    from plugtune.artifacts.outline import ModelOutline
    from plugtune.data.conversations import (
        BUILTIN_TEMPLATES,
        ChatTemplate,
        Message,
        Span,
        check_messages,
        cut_points,
        describe_formats,
        detect_format,
        format_keys,
        to_messages,
        token_mask,
        tokenize_pieces,
        tokenize_with_offsets,
    )
    from plugtune.data.labels import IGNORE_INDEX, LabelPositions, eval_batch_from_label_logits, per_example_loss
    from plugtune.data.tasks import (
        LabelWords,
        Labels,
        Template,
        build_task,
        check_template,
        collate,
        fill,
        fill_one,
        natural_key,
        template_fields,
    )
    from plugtune.training.loss import answer_log_probs
    from plugtune.training.train import RunState


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plugtune.sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    # hooks and registration
    "hookimpl", "Register", "RegisterMethods", "RegisterLoaders", "RegisterRegularizers", "RegisterEvaluators",
    "RegisterTasks", "RegisterAliases", "RegisterTrackers",
    # options
    "ComponentOptions", "NoOptions", "DataPath", "DataFileOrFolder", "not_regular", "open_regular", "plugtune_home",
    "did_you_mean",
    # the kinds
    "DataLoader", "RowStream", "Task", "Head", "TuningMethod", "PrepareContext", "BaseLoading", "MemoryHints", "Regularizer", "Evaluator", "BaseModelAlias",
    "PackagedModel", "ChecksModel", "ModelOutline",
    # the host side of a tuning method and its capabilities
    "AdapterHandler", "MixesRows", "Folds", "Merges", "StartsDecoding", "ReportsResidentBytes", "Combines",
    "Combined", "ExportsLora", "PlainLora", "Adapter", "mixes_rows", "original_module", "replace_module", "remove_wrapper",
    "beneath_wrappers",
    # records the core hands components
    "Example", "EvalBatch", "EvalContext", "EvalMetrics", "Decision", "Direction", "MetricDirections", "RunState",
    # the batch format and the helpers task plugins share
    "IGNORE_INDEX", "LabelPositions", "eval_batch_from_label_logits", "per_example_loss", "Template", "Labels",
    "LabelWords", "check_template", "collate", "fill", "fill_one", "natural_key", "template_fields", "build_task",
    # conversations
    "BUILTIN_TEMPLATES", "ChatTemplate", "Message", "Span", "check_messages", "describe_formats", "detect_format",
    "to_messages", "token_mask", "tokenize_with_offsets", "tokenize_pieces", "cut_points", "format_keys",
    "RendersChat",
    # tasks that compute their own loss (preference objectives, reward models)
    "ComputesLoss", "TaskLoss", "ReferenceMode", "answer_log_probs", "ScoresTexts",
    # experiment trackers (tracking: in a recipe)
    "Tracker", "FiniteScalars", "flatten_params",
    # errors
    "PlugtuneError", "RecipeError", "DataError", "ModelError", "AdapterError", "PluginError", "TrainingError",
]
