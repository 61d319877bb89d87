"""``AdapterHost``: one base model in memory, many adapters beside it.

    host = AdapterHost.from_adapters("adapters/support", "adapters/support-r4")
    host.use("support")                     # a pointer change in the method, not a reload
    host.generate(["My card was charged twice"])
    host.generate(prompts, adapters=["support", None, "support-r4"])   # one adapter per row
    for step in host.stream(prompts, ["support", None, "support-r4"]):  # token by token
        ...
    host.merge("support"); ...; host.unmerge()   # fold into the base weights, and back exactly
    host.unload("support-r4")

Each adapter is attached by its method's handler (one instance per handler class on a host;
:func:`plugtune.artifacts.handlers.resolve_handler` finds it from the manifest). Rows of
handlers that mix rows (LoRA's routed layers, and any handler declaring
:class:`~plugtune.kernel.components.MixesRows`) share one forward, each handler told only
its own rows, and every row gives exactly what its adapter gives alone; other adapters run
as groups of their own.

Loading is strict: an adapter made for another base (fingerprint or tensor shapes), another
task, or by a method whose plugin is not installed, and a damaged or pickled weights file,
are refused with an :class:`AdapterError` that says what was expected.

What a handler must and may do (``attach``/``activate``/``detach``; mixing rows, folding,
merging, a decode start, resident bytes, combining) is documented once, on
:class:`plugtune.kernel.components.AdapterHandler` and its capability protocols.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plugtune.artifacts.adapters import Adapter, Manifest, read_adapter, read_manifest
from plugtune.artifacts.handlers import resolve_handler
from plugtune.serving.decoding import DecodeGroup, as_list, eos_ids, stops_per_row
from plugtune.serving.engine import DecodeEngine, GroupParts, RowSpec, TextStream
from plugtune.kernel.components import Folds, RendersChat, ReportsResidentBytes, ScoresTexts, StartsDecoding, mixes_rows
from plugtune.kernel.errors import AdapterError, DataError
from plugtune.artifacts.models import LoadedBase, load_base
from plugtune.kernel.registry import PluginSystem, get_plugin_system
from plugtune.data.tasks import Task, build_task


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
    task: Task  # built once from the manifest's task record (its chat template included)
    end_of_turn: frozenset[int] = frozenset()  # tokens that end its turns besides EOS (a chat task's)
    serial: int = 0  # which load of this host it came from (a reload under the same name is another)


class AdapterHost:
    """A resident base model and the adapters attached to it."""

    def __init__(self, base: LoadedBase, task: Task, plugins: PluginSystem | None = None) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.task = task
        self.plugins = plugins or get_plugin_system()
        self.adapters: dict[str, HostedAdapter] = {}
        self.active: str | None = None
        self.merged: str | None = None  # the adapter folded into the base weights, if any
        # One handler per tuning method class: it keeps that method's host-side state (peft's
        # wrapper, the base values a full-weight delta overwrote) for all its adapters.
        self.handlers: dict[type, Any] = {}
        self.precision: Any = None  # how the serving dtype was chosen (plugtune serve --dtype), if it was
        self._loads = 0
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
                      dtype: torch.dtype | None = None, allow_pickle: bool = False) -> AdapterHost:
        """Load the base the first adapter names (or ``base_model``), then every adapter;
        the first one is active. ``allow_pickle``: as in :meth:`load`."""
        if not directories:
            raise AdapterError("no adapters given")
        first = read_manifest(directories[0])
        host = cls.from_base(base_model or first.base_model.id, build_task(first.task, plugins, where=f"adapter {directories[0]}: task"), plugins,
                             device=device, dtype=dtype)
        names = [host.load(directory, allow_pickle=allow_pickle) for directory in directories]
        host.use(names[0])
        return host

    # -- adapters -----------------------------------------------------------------------

    def load(self, directory: str | Path, name: str | None = None, *, allow_pickle: bool = False) -> str:
        """Attach the adapter in ``directory`` as ``name`` (default: its manifest name).
        The active adapter does not change; call :meth:`use` to switch to it. A pickled
        weights file (``adapter_model.bin``) is refused unless ``allow_pickle`` (then it is
        read with ``torch.load(weights_only=True)``). The same as :meth:`attach` of
        :func:`~plugtune.artifacts.adapters.read_adapter`'s result."""
        return self.attach(read_adapter(directory, allow_pickle=allow_pickle), name)

    def attach(self, adapter: Adapter, name: str | None = None) -> str:
        """Attach an adapter already read from disk (:func:`~plugtune.artifacts.adapters.read_adapter`)
        as ``name`` (default: its manifest name), with :meth:`load`'s checks. Only this part
        touches the model: the file read can happen on another thread (the adapter cache's
        prefetch)."""
        directory = adapter.path
        m = adapter.manifest
        name = name or m.name
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it or pick another name")
        if m.base_model.fingerprint != self.base.info.fingerprint:
            raise AdapterError(
                f"adapter {name!r} was trained on base {m.base_model.id!r} ({m.base_model.fingerprint}), "
                f"but the resident base is {self.base.info.id!r} ({self.base.info.fingerprint})"
            )
        task = build_task(m.task, self.plugins, where=f"adapter {directory}: task")
        bind = getattr(task, "bind_tokenizer", None)
        if bind is not None:
            bind(self.tokenizer)
        if task.head != self.task.head or (task.is_classification and task.labels != self.task.labels):
            raise AdapterError(
                f"adapter {name!r} is for task {task.type} (labels {task.labels}); this host serves "
                f"{self.task.type} (labels {self.task.labels})"
            )
        spec = resolve_handler(m, self.plugins, subject=f"adapter {name!r}")
        # One handler per handler class: int8 training produces LoRA adapters, hosted with
        # every other LoRA adapter by LoRA's handler.
        handler = self.handlers.get(spec.cls)
        if handler is None:
            handler = self.handlers[spec.cls] = spec.build()
        if getattr(handler, "attach_reads_base_weights", True):
            if self.merged is not None:
                raise AdapterError(f"adapter {self.merged!r} is merged into the base; call unmerge() before loading {name!r}")
            previous = self.active
            self._apply(None)  # attach onto the bare base, then restore the active adapter
            try:
                runner = handler.attach(self.base.model, name, adapter.state, adapter.config)
            finally:
                self._apply(previous)
        else:  # the handler only stores tensors: no need to take the active adapter off
            runner = handler.attach(self.base.model, name, adapter.state, adapter.config)
        if runner is not self.base.model:
            runner.eval()
        end_of_turn = frozenset(task.end_of_turn_ids(self.tokenizer)) if isinstance(task, RendersChat) else frozenset()
        self._loads += 1
        self.adapters[name] = HostedAdapter(name, Path(directory), m, handler, runner, adapter.size_bytes, task, end_of_turn,
                                            self._loads)
        return name

    def unload(self, name: str) -> None:
        """Detach ``name`` and free its tensors; the base is untouched."""
        hosted = self._get(name)
        if self.merged == name:
            self.unmerge()
        if self.active == name:
            self._apply(None)
        hosted.method.detach(self.base.model, name)
        del self.adapters[name]

    def use(self, name: str | None) -> None:
        """Make ``name`` the active adapter (``None``: the bare base)."""
        if name is not None:
            self._get(name)
        if self.active == name:
            return
        self._check_not_merged([name])
        self._apply(name)

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Run the block with ``name`` active, then switch back (nothing to undo when it
        already was: decoding enters this every step)."""
        previous = self.active
        self.use(name)
        if previous == name:
            yield
            return
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

    def list(self) -> list[dict[str, Any]]:
        """One record per resident adapter: name, method, file size, memory its tensors take
        on this host (where its method reports it), base fingerprint, task type and labels,
        folder, and whether it is active or merged."""
        return [
            {"name": h.name, "method": h.manifest.method.name, "size_bytes": h.size_bytes,
             "resident_bytes": h.method.resident_bytes(self.base.model, h.name) if isinstance(h.method, ReportsResidentBytes) else None,
             "base_fingerprint": h.manifest.base_model.fingerprint, "task": h.manifest.task.get("type"),
             "labels": h.manifest.task.get("labels"), "path": str(h.path), "active": h.name == self.active,
             "merged": h.name == self.merged}
            for h in self.adapters.values()
        ]

    # -- merging ------------------------------------------------------------------------

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights, for inference at the bare base's cost;
        it becomes the active adapter. :meth:`unmerge` restores the base exactly (the
        original values of every touched tensor are kept, not recomputed). While merged, the
        host serves only that adapter."""
        hosted = self._get(name)
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is already merged into the base; call unmerge() first")
        if not isinstance(hosted.method, Folds):
            raise AdapterError(f"adapter {name!r}: {hosted.manifest.method.name} adapters cannot be merged into the base weights")
        self.use(name)
        hosted.method.fold(self.base.model, name)
        self.merged = name

    def unmerge(self) -> None:
        """Take the merged adapter out of the base weights again (bit-exact); it stays
        active, served unmerged."""
        if self.merged is None:
            return
        name, self.merged = self.merged, None
        self.adapters[name].method.unfold(self.base.model)
        self._apply(name)

    def _check_not_merged(self, names: Sequence[str | None]) -> None:
        if self.merged is not None and any(n != self.merged for n in names):
            other = next(n for n in names if n != self.merged)
            raise AdapterError(f"adapter {self.merged!r} is merged into the base; call unmerge() before using {other!r}")

    def _get(self, name: str) -> HostedAdapter:
        try:
            return self.adapters[name]
        except KeyError:
            loaded = ", ".join(self.adapters) or "none"
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})") from None

    # -- inference ----------------------------------------------------------------------

    def format_prompt(self, text: str, adapter: str | None = None) -> str | list[int]:
        """The prompt for one raw input ``text``: the task's one-field prompt template filled
        with it, or, for a task that renders chat (:class:`~plugtune.sdk.RendersChat`), the
        ids of ``text`` as one user message in the adapter's own chat template."""
        task = self.adapters[adapter].task if adapter else self.task
        if isinstance(task, RendersChat) and adapter:
            return self.chat_prompt([{"role": "user", "content": text}], adapter)
        prompt = task.format_prompt(text)
        return text if prompt is None else prompt

    def chat_prompt(self, messages: Sequence[dict[str, Any]], adapter: Any = ACTIVE, *, tokenizer: Any = None) -> list[int]:
        """The prompt ids that answer ``messages`` (``[{"role", "content"}]``) with ``adapter``
        (default: the active one; ``None``: the bare base). The rule, the same for
        :meth:`chat` and the server's ``/v1/chat/completions``:

        * an adapter whose task renders chat (trained on conversations) renders them with the
          chat template recorded in its manifest: the whole conversation, system prompt and
          earlier turns kept, token for token as in training;
        * an adapter trained on single prompts (a one-field prompt template) gets that
          template filled with the last user message, as it was trained;
        * otherwise, the bare base included, the tokenizer's own chat template, or plain
          ``role: content`` lines ending in ``assistant:`` when it has none.

        Bad messages (no user message where one is needed, an unknown role) are one-line
        :class:`~plugtune.kernel.errors.DataError`s. ``tokenizer``: a copy of the host's to
        render with (a server renders on several threads; a tokenizer is not thread-safe)."""
        from plugtune.data.conversations import check_messages

        tokenizer = tokenizer or self.tokenizer
        name = self.active if adapter is ACTIVE else adapter
        turns = check_messages(list(messages))
        task = self._get(name).task if name is not None else None
        if isinstance(task, RendersChat):
            return task.encode_chat(turns, tokenizer)
        if task is not None and task.head == "lm" and task.format_prompt("") is not None:
            users = [m for m in turns if m["role"] == "user"]
            if not users:
                raise DataError(f"adapter {name!r} fills its prompt template with the last user message; send at least one")
            return tokenizer(task.format_prompt(users[-1]["content"]))["input_ids"]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
        return tokenizer(text)["input_ids"]

    def chat(self, messages: Sequence[dict[str, Any]], adapter: Any = ACTIVE, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: str | Sequence[str] | None = None) -> str:
        """The assistant's answer to ``messages``, rendered by :meth:`chat_prompt`'s rule and
        generated with ``adapter`` (greedy unless ``temperature``); stops at the end of the
        turn (the template's end-of-turn token), at a ``stop`` string or after
        ``max_new_tokens``."""
        name = self.active if adapter is ACTIVE else adapter
        return self.generate([self.chat_prompt(messages, name)], name, max_new_tokens=max_new_tokens, raw=True,
                             temperature=temperature, top_p=top_p, seed=seed, stop=stop)[0]

    def _per_row(self, items: Sequence[str], adapters: Any) -> list[str | None]:
        if adapters is ACTIVE:
            adapters = self.active
        if adapters is None or isinstance(adapters, str):
            return [adapters] * len(items)
        if len(adapters) != len(items):
            raise AdapterError(f"{len(items)} inputs but {len(adapters)} adapters; give one adapter per input")
        return list(adapters)

    def _mixable(self, name: str | None) -> bool:
        """Whether row ``name`` can share the forward through the bare base with rows of
        other adapters: its handler mixes rows and runs it through the base itself."""
        if name is None:
            return True
        hosted = self.adapters[name]
        return mixes_rows(hosted.method) and hosted.runner is self.base.model

    @contextlib.contextmanager
    def _routed(self, names: list[str | None]) -> Iterator[None]:
        """Rows of the next forwards through the bare base, each with its own adapter: every
        mixing handler present is told only its own rows (``None`` for the others), and
        their layer wrappers compose, so each row runs exactly its adapter."""
        owners: dict[int, tuple[Any, list[str | None]]] = {}
        for i, name in enumerate(names):
            if name is None:
                continue
            handler = self.adapters[name].method
            _, rows = owners.setdefault(id(handler), (handler, [None] * len(names)))
            rows[i] = name
        with self.using(None), contextlib.ExitStack() as stack:
            for handler, rows in owners.values():
                stack.enter_context(handler.mixed_rows(self.base.model, rows))
            yield

    def _groups(self, names: list[str | None]) -> list[DecodeGroup]:
        """Rows that share a forward (see :meth:`group_key`), for scoring, classifying and
        logits."""
        for name in names:
            if name is not None:
                self._get(name)
        self._check_not_merged(names)
        keys = [self.group_key(n) for n in names]
        groups = []
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            name = names[rows[0]]
            if key == "shared":
                groups.append(DecodeGroup(rows, self.base.model, lambda rows: self._routed([names[i] for i in rows])))
            elif key == "merged":
                groups.append(DecodeGroup(rows, self.base.model, lambda rows: contextlib.nullcontext()))
            else:
                groups.append(DecodeGroup(rows, self.adapters[name].runner, lambda _, name=name: self.using(name)))
        return groups

    def group_key(self, name: str | None) -> Any:
        """Which forward a row of adapter ``name`` shares: ``"shared"`` for every row of a
        mixing handler (LoRA's, and any other that declares
        :class:`~plugtune.kernel.components.MixesRows`) and every bare-base row;
        ``("adapter", name)`` for an adapter of any other handler; ``"merged"`` while an
        adapter is merged (every row then names it)."""
        if self.merged is not None:
            return "merged"
        return "shared" if self._mixable(name) else ("adapter", name)

    def group_parts(self, key: Any) -> GroupParts:
        """How the rows of group ``key`` (:meth:`group_key`) decode: the model, how to put
        their adapters in place, and a decode start (a prefix adapter decodes through the
        bare base from its prefix cache)."""
        if key == "shared":
            return GroupParts(self.base.model, self._routed)
        if key == "merged":
            return GroupParts(self.base.model, lambda names: contextlib.nullcontext())
        name = key[1]
        hosted = self._get(name)
        if isinstance(hosted.method, StartsDecoding):
            model, start = hosted.method.decode_parts(self.base.model, name)
            return GroupParts(model, lambda names: self.using(name), start)
        return GroupParts(hosted.runner, lambda names: self.using(name))

    def prefix_key(self, name: str | None) -> Any:
        """Whose keys and values a prompt prefix has on adapter ``name`` (for the engine's
        prefix cache): the adapter and its load, so a reload under the same name starts
        afresh; ``None`` (no caching) while an adapter is merged into the base weights."""
        if self.merged is not None:
            return None
        return ("base", 0) if name is None else (name, self._get(name).serial)

    def decode_engine(self, *, max_rows: int = 16, step_tokens: int = 512, chunk_tokens: int = 256,
                      mask_fn: Any = None, seed: int | None = None, prefix_cache_bytes: int = 0) -> DecodeEngine:
        """A continuous-batching :class:`~plugtune.serving.engine.DecodeEngine` over this
        host's adapters (the server runs one; :meth:`stream` makes one per call).
        ``prefix_cache_bytes``: room for prompt prefixes' keys and values, reused by later
        requests that start alike on the same adapter (0: none)."""
        eos = eos_ids(self.tokenizer, self.base.model.generation_config)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos, default=0)
        return DecodeEngine(self.tokenizer, group_key=self.group_key, parts=self.group_parts, eos=eos, pad=pad,
                            device=self._device(), max_rows=max_rows, step_tokens=step_tokens,
                            chunk_tokens=chunk_tokens, mask_fn=mask_fn, seed=seed, prefix_key=self.prefix_key,
                            prefix_cache_bytes=prefix_cache_bytes)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids (ids are used as given); an empty prompt starts from the BOS
        token (or an end-of-sequence token when the tokenizer has none), as a model needs one
        position."""
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt)["input_ids"]
        if ids:
            return ids
        if self.tokenizer.bos_token_id is not None:
            return [self.tokenizer.bos_token_id]
        eos = eos_ids(self.tokenizer, self.base.model.generation_config)
        return [min(eos | ({self.tokenizer.pad_token_id} if self.tokenizer.pad_token_id is not None else set()))]

    def _grouped(self, items: Sequence[str], adapters: Any, fn: Any) -> list[Any]:
        """``fn(batch, group)`` once per group of rows that share a forward."""
        names = self._per_row(items, adapters)
        results: list[Any] = [None] * len(items)
        for group in self._groups(names):
            with group.activate(group.rows):
                for i, out in zip(group.rows, fn([items[i] for i in group.rows], group)):
                    results[i] = out
        return results

    def stream(self, prompts: Sequence[str | list[int]], adapters: Any = ACTIVE, *, max_new_tokens: int | Sequence[int] = 32,
               raw: bool = False, temperature: float | Sequence[float] = 0.0,
               top_p: float | Sequence[float] = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | Sequence[Sequence[str] | None] | None = None,
               ignore_eos: bool = False) -> TextStream:
        """Decode all rows together (one forward per step, mixed adapters where the method
        allows); yields, per step, the new text of each row ('' for a row that has finished).

        ``adapters``: one name (``None``: the bare base) or one per prompt; default the active
        adapter. Prompts fill the adapter's prompt template unless ``raw`` (see
        :meth:`format_prompt`); a prompt given as a list of token ids is used as it is. A row
        whose adapter was trained on conversations also stops at its template's end-of-turn
        token. ``temperature``
        and ``top_p`` are one value or one per row (temperature 0: greedy); ``seed`` makes
        sampling repeatable; a row stops at an end-of-sequence token, at the first ``stop``
        string (not included in the text) or after ``max_new_tokens`` tokens
        (``ignore_eos``: only the last two; for benchmarks that need a fixed length).
        ``max_new_tokens`` is one budget or one per row; ``stop`` is one list of strings for
        every row or one list per row, so one batch can serve requests with other settings.

        The returned :class:`~plugtune.serving.engine.TextStream` also tells, per row,
        ``finish_reasons`` (``"stop"``, ``"length"`` or ``"cancelled"`` once finished, ``None``
        before), ``prompt_tokens`` and ``completion_tokens``; its ``cancel(i)`` takes a row out
        (a client gone). Rows are decoded with a KV cache; a row leaves its group's batch in
        the step it finishes, and a group whose rows have all finished stops running forwards."""
        if self.task.is_classification:
            use = "score() or classify()" if self.scores else "classify()"
            raise AdapterError(f"this host holds a classifier base ({self.task.type}): its adapters do not generate; use {use}")
        names = self._per_row(prompts, adapters)
        for name in names:
            if name is not None:
                self._get(name)
        self._check_not_merged(names)
        texts = [p if raw or not isinstance(p, str) else self.format_prompt(p, n) for p, n in zip(prompts, names)]
        n = len(texts)
        budgets = as_list(max_new_tokens, n, "max_new_tokens", cast=int)
        temperatures, top_ps = as_list(temperature, n, "temperature"), as_list(top_p, n, "top_p")
        stops = stops_per_row(stop, n)
        ids = self.tokenizer([t for t in texts if isinstance(t, str)])["input_ids"] if any(isinstance(t, str) for t in texts) else []
        words = iter(ids)
        specs = [RowSpec(self.prompt_ids(next(words) if isinstance(t, str) else t), names[i], budgets[i], temperatures[i],
                         top_ps[i], None, stops[i], set() if ignore_eos else self._end_of_turn(names[i]), ignore_eos)
                 for i, t in enumerate(texts)]
        engine = self.decode_engine(max_rows=max(1, n), step_tokens=10**9, chunk_tokens=10**9, seed=seed)
        return TextStream(engine, specs)

    def _end_of_turn(self, name: str | None) -> frozenset[int]:
        return self.adapters[name].end_of_turn if name is not None else frozenset()

    def generate(self, prompts: Sequence[str | list[int]], adapters: Any = ACTIVE, *, max_new_tokens: int | Sequence[int] = 32,
                 raw: bool = False, temperature: float | Sequence[float] = 0.0,
                 top_p: float | Sequence[float] = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | Sequence[Sequence[str] | None] | None = None,
                 ignore_eos: bool = False) -> list[str]:
        """The whole continuation of each prompt: :meth:`stream` joined, without surrounding
        whitespace (greedy when temperature is 0; per-row sampling otherwise; per-row
        ``max_new_tokens`` and ``stop`` as in :meth:`stream`)."""
        stream = self.stream(prompts, adapters, max_new_tokens=max_new_tokens, raw=raw, temperature=temperature,
                             top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos)
        for _ in stream:
            pass
        return [t.strip() for t in stream.texts]

    @property
    def scores(self) -> bool:
        """Whether this host's adapters score texts (a reward model's one-output head,
        :class:`~plugtune.kernel.components.ScoresTexts`) rather than classify them."""
        return isinstance(self.task, ScoresTexts)

    @torch.no_grad()
    def score(self, texts: Sequence[str | Sequence[dict[str, Any]]], adapters: Any = ACTIVE) -> list[float]:
        """One score per input from a scoring adapter (a reward model): each input a text or
        a conversation (messages ending with the answer), encoded by the adapter's task as
        training encoded its pairs (:meth:`~plugtune.kernel.components.ScoresTexts.encode_scored`);
        ``adapters`` as in :meth:`generate`. Rows of different adapters share a forward
        where their method allows."""
        from plugtune.data.datacheck import context_length

        if not self.scores:
            kind = "a language-model" if not self.task.is_classification else f"a {self.task.type} classifier"
            raise AdapterError(f"this host holds {kind} base, not a scoring one (a reward model); "
                               f"use {'classify()' if self.task.is_classification else 'generate()'}")
        names = self._per_row(texts, adapters)
        longest = context_length(self.base.model) or 10**9
        ids = []
        for text, name in zip(texts, names):
            task = self._get(name).task if name is not None else self.task
            ids.append(task.encode_scored(text if isinstance(text, str) else list(text), self.tokenizer, longest))
        pad = self.tokenizer.pad_token_id

        def run(batch: list[list[int]], group: DecodeGroup) -> list[float]:
            width = max(len(row) for row in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T), right-padded
            mask = torch.zeros_like(input_ids)
            for i, row in enumerate(batch):
                input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            device = self._device()
            logits = group.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (B, 1)
            return logits.float()[:, 0].tolist()

        return self._grouped(ids, names, run)

    @torch.no_grad()
    def classify(self, texts: Sequence[str], adapters: Any = ACTIVE) -> list[dict[str, Any]]:
        """Label and class probabilities per text; ``adapters`` as in :meth:`generate`. On a
        scoring host (:attr:`scores`: reward models) each result is ``{"score": ...}``,
        from :meth:`score`."""
        if not self.task.is_classification:
            raise AdapterError("this host holds a language-model base; use generate()")
        if self.scores:
            return [{"score": value} for value in self.score(texts, adapters)]
        labels = self.task.labels or []

        names = self._per_row(texts, adapters)
        formatted = [self.format_prompt(t, n) for t, n in zip(texts, names)]

        def run(batch: list[str], group: DecodeGroup) -> list[dict[str, Any]]:
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True).to(self._device())
            probs = group.model(**enc).logits.float().softmax(-1)  # (B, C)
            return [{"label": labels[int(p.argmax())], "scores": {l: float(s) for l, s in zip(labels, p)}} for p in probs]

        return self._grouped(formatted, names, run)

    @torch.no_grad()
    def logits(self, texts: Sequence[str], adapter: Any = ACTIVE) -> torch.Tensor:
        """Raw logits for a right-padded batch of raw texts (for tests and comparisons);
        ``adapter`` as ``adapters`` in :meth:`generate`, so rows may name different adapters.
        A causal LM's are ``(B, T, V)``, one per real token position: the positions of an
        adapter's virtual tokens (prompt tuning prepends them) are left out."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True).to(self._device())
        names = self._per_row(texts, adapter)
        out: torch.Tensor | None = None
        for group in self._groups(names):
            rows = torch.tensor(group.rows, device=enc["input_ids"].device)
            with group.activate(group.rows):
                logits = group.model(**{k: v[rows] for k, v in enc.items()}).logits
            if logits.dim() == 3:  # (B, T', V): an adapter that prepends T' - T virtual tokens gives them first
                logits = logits[:, logits.size(1) - enc["input_ids"].size(1):]
            if out is None:
                out = logits.new_zeros((len(texts), *logits.shape[1:]))
            out[rows] = logits
        assert out is not None
        return out

    def _device(self) -> torch.device:
        return next(self.base.model.parameters()).device
