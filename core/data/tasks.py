"""Tasks: the machinery every task component shares, and building a task by its name.

A task is a component (:class:`plugtune.kernel.components.Task`, registered with
``register_tasks``): the core never names one. This module holds what the core does with
any task, and helpers task plugins may reuse:

* :func:`build_task`: a manifest's or recipe's ``task`` dict -> a task, through the registry
  (hosts, ``plugtune eval``/``merge``/``combine`` and the server use it);
* :func:`raw_prompt_task`: the task that serves plain text prompts (``--base MODEL``);
* :data:`Template`, :func:`template_fields`, :func:`fill`: ``{column}`` format-string
  templates over an example's keys;
* :data:`Labels`, :data:`LabelWords`, :func:`natural_key`: label names as strings;
* :func:`collate`: right-pad encoded rows into the training batch format.

``Task`` here is the protocol itself, re-exported so ``from plugtune.data.tasks import Task``
(and the old ``plugtune.tasks``) keep working for type annotations.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ValidationError

from plugtune.data.labels import IGNORE_INDEX
from plugtune.kernel.components import Task
from plugtune.kernel.errors import PluginError
from plugtune.kernel.registry import Component, PluginSystem, get_plugin_system, unknown_name_message

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------------
# Templates and labels
# --------------------------------------------------------------------------------------------


def template_fields(template: str | None) -> set[str]:
    """The column names a template refers to (``"{a} and {b}"`` -> ``{"a", "b"}``)."""
    if not template:
        return set()
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def fill_one(template: str | None, text: str) -> str | None:
    """A template with exactly one field, filled with ``text`` (what a task's
    ``format_prompt`` does for a raw input on a host); None for any other template."""
    fields = template_fields(template)
    return fill(template, {next(iter(fields)): text}) if template and len(fields) == 1 else None


def fill(template: str, example: Mapping[str, Any]) -> str:
    """``template`` with each ``{column}`` replaced by the example's value (None -> "")."""
    return template.format_map({k: "" if v is None else v for k, v in example.items()})


MAX_FORMAT_WIDTH = 1000  # a format spec's width or precision in a template (``{score:.3f}``, ``{id:>8}``)


def check_template(value: str) -> str:
    """Refuse a template that would fail at the first example: bad braces, or a field that
    is not a plain column name (``{0}``, ``{a.b}``, ``{a[0]}``)."""
    how = "write a literal brace as {{ or }}, and name columns as {column}"
    try:
        parsed = [(f, spec) for _, f, spec, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); {how}") from None
    fields = [f for f, _ in parsed]
    for field, spec in parsed:  # {question:4000000000} would build a 4 GB string per row
        big = [n.lstrip("0") for n in re.findall(r"\d+", spec or "")
               if len(n.lstrip("0")) > 6 or int(n) > MAX_FORMAT_WIDTH]  # length first: no int() of 5000 digits
        if big:
            raise ValueError(f"not a valid template (field {{{field}:{spec[:40]}}} asks for a width or precision "
                             f"of {big[0][:20]}; at most {MAX_FORMAT_WIDTH})")
    for field in fields:
        if not field.isidentifier():
            raise ValueError(f"not a valid template (field {{{field}}} is not a column name); {how}")
    try:
        value.format_map({f: "" for f in fields})
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"not a valid template ({exc}); {how}") from None
    return value


Template = Annotated[str, AfterValidator(check_template)]
"""An ``Options`` field holding a ``{column}`` template, checked at recipe validation."""


def _strings(value: Any) -> Any:
    return [str(v) for v in value] if isinstance(value, list) else value


def _string_map(value: Any) -> Any:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else value


Labels = Annotated[list[str] | None, BeforeValidator(_strings)]
"""Label names; YAML numbers (``[0, 1]``) become strings, as the data's values do."""

LabelWords = Annotated[dict[str, str] | None, BeforeValidator(_string_map)]
"""Raw label value -> the word a language model should say (``{0: negative}``)."""


def natural_key(label: str) -> tuple[int, Any]:
    """Sort key that puts "2" before "10" when labels are numbers."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


# --------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------


def collate(rows: list[dict[str, list[int]]], pad_id: int, classification: bool) -> dict[str, torch.Tensor]:
    """Right-pad encoded rows into the training batch format (see
    :class:`~plugtune.kernel.components.Task`): ``labels`` ``(B, T)`` with ``-100`` on padding,
    or with ``classification`` one class index per row ``(B,)``."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    labels = (
        torch.tensor([r["labels"][0] for r in rows], dtype=torch.long)  # (B,)
        if classification
        else torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    )
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        attention[i, :n] = 1
        if not classification:
            labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --------------------------------------------------------------------------------------------
# Building a task by name
# --------------------------------------------------------------------------------------------


def task_component(name: Any, plugins: PluginSystem | None = None, *, where: str = "task.type") -> Component:
    """The registered task component called ``name``; a one-line :class:`PluginError` with
    a did-you-mean and the installed names when there is none."""
    plugins = plugins or get_plugin_system()
    component = plugins.find("task", name) if isinstance(name, str) else None
    if component is None:
        raise PluginError(f"{where}: " + unknown_name_message("task", str(name), plugins.names("task")))
    return component


def make_task(component: Component, options: Any) -> Task:
    """Instantiate a task component with its validated ``Options``."""
    return component.obj(options, component.name)


def build_task(data: Mapping[str, Any], plugins: PluginSystem | None = None, *, strict: bool = False,
               where: str = "task") -> Task:
    """A task from a ``{"type": name, <options>}`` dict: a manifest's ``task`` (the default:
    keys the task's ``Options`` does not know are dropped, so manifests written by older
    versions, which recorded every field of every task, still load) or, with ``strict``, a
    recipe's block. Unknown types and invalid options are one-line :class:`PluginError`s
    naming ``where`` and the field."""
    if not isinstance(data, Mapping):
        raise PluginError(f"{where}: expected a mapping with a 'type', got {type(data).__name__}")
    component = task_component(data.get("type"), plugins, where=f"{where}.type")
    model = component.obj.Options
    options = {k: v for k, v in data.items() if k != "type" and (strict or k in model.model_fields)}
    try:
        bound = model.model_validate(options)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in (where, *err["loc"]))
        raise PluginError(f"{field}: {err['msg'].removeprefix('Value error, ')}") from None
    return make_task(component, bound)


def raw_prompt_task(plugins: PluginSystem | None = None) -> Task:
    """A task that serves plain text prompts on a language-model head, for a host with no
    adapter (``plugtune generate/serve --base MODEL``): the first installed task component
    declaring ``for_raw_prompts`` (built-ins are registered first)."""
    plugins = plugins or get_plugin_system()
    for name in _registration_order(plugins):
        component = plugins.components["task"][name]
        make = getattr(component.obj, "for_raw_prompts", None)
        if make is not None:
            task = make(component.name)
            if task.head == "lm":
                return task
    raise PluginError("no installed task serves raw text prompts (a task component with for_raw_prompts); "
                      f"installed tasks: {', '.join(plugins.names('task')) or 'none'}")


def _registration_order(plugins: PluginSystem) -> list[str]:
    builtin_first = sorted(plugins.components.get("task", {}).values(), key=lambda c: not c.plugin.builtin)
    return [c.name for c in builtin_first]


__all__ = [
    "IGNORE_INDEX", "LabelWords", "Labels", "Task", "Template", "build_task", "check_template", "collate", "fill",
    "make_task", "natural_key", "raw_prompt_task", "task_component", "template_fields",
]
