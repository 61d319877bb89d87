"""``AdapterHost``: one base model in memory, many adapters beside it.

    host = AdapterHost.from_adapters("adapters/support", "adapters/support-r4")
    host.use("support")                     # a pointer change in the method, not a reload
    host.generate(["My card was charged twice"])
    host.generate(prompts, adapters=["support", None, "support-r4"])   # one adapter per row
    host.unload("support-r4")

Loading is strict: an adapter made for another base (fingerprint), another task, or by a
method whose plugin is not installed is refused with an :class:`AdapterError` that says
what was expected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import Manifest, read_adapter, read_manifest
from .errors import AdapterError
from .models import LoadedBase, load_base
from .registry import PluginSystem, get_plugin_system
from .tasks import Task, fill, template_fields


class _Active:
    """Default for ``adapter``/``adapters`` arguments: whatever adapter is active."""

    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE: Any = _Active()
"""Pass as ``adapter`` to mean the active adapter; ``None`` always means the bare base."""


@dataclass
class HostedAdapter:
    name: str
    path: Path
    manifest: Manifest
    method: Any  # the method's host-side handler (one per method name on this host)
    runner: torch.nn.Module  # the module that runs this adapter: the base or a wrapper of it
    size_bytes: int

    @property
    def task(self) -> Task:
        return Task.from_dict(self.manifest.task)


class AdapterHost:
    """A resident base model and the adapters attached to it."""

    def __init__(self, base: LoadedBase, task: Task, plugins: PluginSystem | None = None) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.task = task
        self.plugins = plugins or get_plugin_system()
        self.adapters: dict[str, HostedAdapter] = {}
        self.active: str | None = None
        # One handler per tuning method class: it keeps that method's host-side state (peft's
        # wrapper, the base values a full-weight delta overwrote) for all its adapters.
        self.handlers: dict[type, Any] = {}
        base.model.eval()

    @property
    def model(self) -> torch.nn.Module:
        """The module that runs the active adapter (the bare base when none is active)."""
        return self.adapters[self.active].runner if self.active is not None else self.base.model

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_base(cls, base_model: str, task: Task, plugins: PluginSystem | None = None, *,
                  device: str = "auto", dtype: torch.dtype | None = None) -> AdapterHost:
        """Load ``base_model`` for ``task`` on ``device`` (auto: CUDA when present). The
        default dtype is fp32 on CPUs and bf16 on GPUs."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        base = load_base(base_model, task, plugins=plugins, dtype=dtype)
        base.model.to(device)
        return cls(base, task, plugins)

    @classmethod
    def from_adapters(cls, *directories: str | Path, base_model: str | None = None,
                      plugins: PluginSystem | None = None, device: str = "auto",
                      dtype: torch.dtype | None = None) -> AdapterHost:
        """Load the base the first adapter names (or ``base_model``), then every adapter;
        the first one is active."""
        if not directories:
            raise AdapterError("no adapters given")
        first = read_manifest(directories[0])
        host = cls.from_base(base_model or first.base_model.id, Task.from_dict(first.task), plugins,
                             device=device, dtype=dtype)
        names = [host.load(directory) for directory in directories]
        host.use(names[0])
        return host

    # -- adapters -----------------------------------------------------------------------

    def load(self, directory: str | Path, name: str | None = None) -> str:
        """Attach the adapter in ``directory`` as ``name`` (default: its manifest name).
        The active adapter does not change; call :meth:`use` to switch to it."""
        adapter = read_adapter(directory)
        m = adapter.manifest
        name = name or m.name
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it or pick another name")
        if m.base_model.fingerprint != self.base.info.fingerprint:
            raise AdapterError(
                f"adapter {name!r} was trained on base {m.base_model.id!r} ({m.base_model.fingerprint}), "
                f"but the resident base is {self.base.info.id!r} ({self.base.info.fingerprint})"
            )
        task = Task.from_dict(m.task)
        if task.type != self.task.type or (task.is_classification and task.labels != self.task.labels):
            raise AdapterError(
                f"adapter {name!r} is for task {task.type} (labels {task.labels}); this host serves "
                f"{self.task.type} (labels {self.task.labels})"
            )
        component = self.plugins.find("method", m.method.name)
        if component is None:
            dist = f" from distribution {m.method.distribution} {m.method.version}".rstrip() if m.method.distribution else ""
            raise AdapterError(
                f"adapter {name!r} was made by tuning method {m.method.name!r}{dist}, which is not installed; "
                f"install that plugin (see `plugtune plugins`)"
            )
        # A method may hand its adapters to another method's handler (``hosted_by``): int8
        # training produces LoRA adapters, hosted with every other LoRA adapter.
        handler_cls = getattr(component.obj, "hosted_by", component.obj)
        handler = self.handlers.get(handler_cls)
        if handler is None:
            fields = handler_cls.Options.model_fields
            try:
                options = handler_cls.Options.model_validate({k: v for k, v in m.method.options.items() if k in fields})
            except Exception as exc:  # noqa: BLE001
                raise AdapterError(f"adapter {name!r}: its {m.method.name} options are invalid ({exc})") from None
            handler = self.handlers[handler_cls] = handler_cls(options)
        previous = self.active
        self._apply(None)  # attach onto the bare base, then restore the active adapter
        try:
            runner = handler.attach(self.base.model, name, adapter.state, adapter.config)
        finally:
            self._apply(previous)
        runner.eval()
        self.adapters[name] = HostedAdapter(name, Path(directory), m, handler, runner, adapter.size_bytes)
        return name

    def unload(self, name: str) -> None:
        """Detach ``name`` and free its tensors; the base is untouched."""
        hosted = self._get(name)
        if self.active == name:
            self._apply(None)
        hosted.method.detach(self.base.model, name)
        del self.adapters[name]

    def use(self, name: str | None) -> None:
        """Make ``name`` the active adapter (``None``: the bare base)."""
        if name is not None:
            self._get(name)
        self._apply(name)

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        previous = self.active
        self.use(name)
        try:
            yield
        finally:
            self._apply(previous)

    def _apply(self, name: str | None) -> None:
        owner = self.adapters[name].method if name is not None else None
        for handler in self.handlers.values():
            if handler is not owner:
                handler.activate(self.base.model, None)
        if owner is not None:
            owner.activate(self.base.model, name)
        self.active = name

    def _get(self, name: str) -> HostedAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            loaded = ", ".join(self.adapters) or "none"
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})") from None

    # -- inference ----------------------------------------------------------------------

    def format_prompt(self, text: str, adapter: str | None = None) -> str:
        """Fill the task's prompt template with ``text`` when it has exactly one field."""
        task = self.adapters[adapter].task if adapter else self.task
        template = task.text if task.is_classification else task.prompt
        fields = template_fields(template)
        if template and len(fields) == 1:
            return fill(template, {next(iter(fields)): text})
        return text

    def _per_row(self, items: Sequence[str], adapters: Any) -> list[str | None]:
        if adapters is ACTIVE:
            adapters = self.active
        if adapters is None or isinstance(adapters, str):
            return [adapters] * len(items)
        if len(adapters) != len(items):
            raise AdapterError(f"{len(items)} inputs but {len(adapters)} adapters; give one adapter per input")
        return list(adapters)

    def _grouped(self, items: Sequence[str], adapters: Any, fn: Any) -> list[Any]:
        names = self._per_row(items, adapters)
        results: list[Any] = [None] * len(items)
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            with self.using(name):
                for i, out in zip(rows, fn([items[i] for i in rows], name)):
                    results[i] = out
        return results

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapters: Any = ACTIVE, *,
                 max_new_tokens: int = 32, raw: bool = False) -> list[str]:
        """Greedy continuations. ``adapters``: one name (``None``: the bare base) or one per
        prompt; default the active adapter. Prompts fill the adapter's prompt template unless
        ``raw``."""
        if self.task.is_classification:
            raise AdapterError("this host holds a sequence-classification base; use classify()")

        def run(batch: list[str], name: str | None) -> list[str]:
            texts = batch if raw else [self.format_prompt(p, name) for p in batch]
            self.tokenizer.padding_side = "left"
            enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self._device())
            self.tokenizer.padding_side = "right"
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

        return self._grouped(prompts, adapters, run)

    @torch.no_grad()
    def classify(self, texts: Sequence[str], adapters: Any = ACTIVE) -> list[dict[str, Any]]:
        """Label and class probabilities per text; ``adapters`` as in :meth:`generate`."""
        if not self.task.is_classification:
            raise AdapterError("this host holds a causal-lm base; use generate()")
        labels = self.task.labels or []

        def run(batch: list[str], name: str | None) -> list[dict[str, Any]]:
            enc = self.tokenizer([self.format_prompt(t, name) for t in batch], return_tensors="pt",
                                 padding=True, truncation=True).to(self._device())
            probs = self.model(**enc).logits.float().softmax(-1)  # (B, C)
            return [{"label": labels[int(p.argmax())], "scores": {l: float(s) for l, s in zip(labels, p)}} for p in probs]

        return self._grouped(texts, adapters, run)

    @torch.no_grad()
    def logits(self, texts: Sequence[str], adapter: Any = ACTIVE) -> torch.Tensor:
        """Raw logits for a right-padded batch of raw texts (for tests and comparisons)."""
        with self.using(self.active if adapter is ACTIVE else adapter):
            enc = self.tokenizer(list(texts), return_tensors="pt", padding=True).to(self._device())
            return self.model(**enc).logits

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
