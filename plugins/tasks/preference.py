"""``preference``: align a language model with pairs of a preferred and a rejected answer.

Rows (``normalize`` tells them apart row by row):

* **pairs** ``{prompt, chosen, rejected}``: ``prompt`` as text, or as a list of chat messages
  (then ``chosen``/``rejected`` are the assistant's answer, as text or as a one-message list);
* **pairs without a prompt column** ``{chosen, rejected}`` as whole conversations: the prompt
  is the messages they share, the answers their last assistant messages;
* **unpaired** ``{prompt, completion, label}`` for KTO: ``label`` true (desirable) or false.

Text prompts are tokenized as they are, each answer followed by the end-of-sequence token;
the answer starts where the tokens of prompt and prompt + answer part (as TRL does, so a
token that merges across the boundary counts as answer). Message prompts are rendered with a
chat template (``template``, as the ``chat`` task's), and the answer is the assistant's turn
with its end-of-turn token; a host renders chat requests to the adapter the same way
(:class:`~plugtune.sdk.RendersChat`). The loss covers the answers' tokens only.

``objective`` is one of (``objective: dpo`` or ``objective: {name: simpo, beta: 2.0, gamma: 0.5}``):

``dpo``  ``-log σ(β·Δ)``, Δ the chosen answer's log-ratio to the reference minus the rejected
         one's; ``label_smoothing`` ε mixes in ``-log σ(-β·Δ)`` (conservative DPO).
``ipo``  ``(Δ/len - 1/(2β))²`` with the log-ratios averaged per answer token (TRL's form).
``hinge`` ``max(0, 1 - β·Δ)``.
``orpo`` no reference: the chosen answer's cross-entropy plus ``β·(-log σ(log-odds ratio))``.
``simpo`` no reference: ``-log σ(β·(mean log-p chosen - mean log-p rejected) - γ)``.
``kto``  unpaired (pairs count as one desirable and one undesirable answer): each answer's
         log-ratio against a KL estimate from mismatched prompt/answer pairs of the batch,
         weighted by ``desirable_weight``/``undesirable_weight``.

``sft_weight`` adds that much of the chosen answers' cross-entropy (not for ``orpo``, which
has it built in). The reference (``reference``: ``auto``, ``adapter_off``, ``precomputed``,
``copy``) is the base with the adapter switched off, scored in the step, or once before
training: core/training/reference.py. The implicit reward of an answer, which the
``preference`` evaluator reads, is ``β`` times its log-ratio (``β`` times its mean token
log-probability for ``orpo`` and ``simpo``). The ``loss`` evaluator reports the objective's
own loss on the held-out pairs (``log 2`` for DPO at the base; ORPO's includes its
cross-entropy), not a language-model loss.

The reference's cost, measured on SmolLM2-135M (BENCHMARKS.md, "Preference tuning"):
``adapter_off`` runs one no-grad forward of the pair per step (about 30% of a DPO step on a
CPU) and holds no second model; ``precomputed`` spends that once before training instead;
``copy`` holds a second copy of the base.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from plugtune import hookimpl
from plugtune.plugins.tasks.chat import Chat, ChatOptions, TemplateOptions
from plugtune.sdk import (
    ComponentOptions,
    DataError,
    EvalBatch,
    Example,
    Head,
    IGNORE_INDEX,
    ReferenceMode,
    Task,
    TaskLoss,
    answer_log_probs,
    check_messages,
)

if TYPE_CHECKING:
    import torch

# -- objectives -----------------------------------------------------------------------------


ObjectiveName = Literal["dpo", "ipo", "hinge", "orpo", "simpo", "kto"]
OWN_PARAMETERS: dict[str, set[str]] = {  # each objective's parameters besides name, beta and sft_weight
    "dpo": {"label_smoothing"}, "ipo": set(), "hinge": set(), "orpo": set(), "simpo": {"gamma"},
    "kto": {"desirable_weight", "undesirable_weight"}}
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
WITHOUT_REFERENCE = {"orpo", "simpo"}


class ObjectiveOptions(ComponentOptions):
    """``task.objective``: a name, or a block with the name and that objective's parameters;
    a parameter of another objective is an error naming the ones that take it."""

    name: ObjectiveName = "dpo"
    beta: float | None = Field(None, gt=0, description="β (default 0.1; 2.0 for simpo; orpo: the weight λ of its odds-ratio term)")
    sft_weight: float = Field(0.0, ge=0, description="weight of the chosen answers' cross-entropy added to the loss")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: ε, the share of pairs assumed mislabelled")
    gamma: float = Field(0.5, ge=0, description="simpo: γ, the reward margin the chosen answer must win by")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable answers' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable answers' loss")

    @model_validator(mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _own_parameters(self) -> ObjectiveOptions:
        foreign = self.model_fields_set - {"name", "beta", "sft_weight"} - OWN_PARAMETERS[self.name]
        for key in sorted(k for k in foreign if getattr(self, k) != type(self).model_fields[k].default):
            takes = [n for n, own in OWN_PARAMETERS.items() if key in own]
            raise ValueError(f"{key} is a parameter of {' and '.join(takes)}, not of {self.name}")
        if self.name == "orpo" and self.sft_weight:
            raise ValueError("orpo already includes the chosen answers' cross-entropy; drop sft_weight")
        if self.beta is None:
            self.__dict__["beta"] = DEFAULT_BETA[self.name]  # no re-validation loop
        return self

    def recorded(self) -> dict[str, Any]:
        """What a manifest records: the name, beta, sft_weight and this objective's own parameters."""
        keep = {"name", "beta", "sft_weight", *OWN_PARAMETERS[self.name]}
        return {k: v for k, v in self.model_dump(mode="json").items() if k in keep}

    @property
    def uses_reference(self) -> bool:
        return self.name not in WITHOUT_REFERENCE

    @property
    def paired(self) -> bool:
        return self.name != "kto"


class PreferenceOptions(TemplateOptions):
    objective: ObjectiveOptions = Field(default_factory=ObjectiveOptions)
    reference: ReferenceMode = Field("auto", description="auto | adapter_off | precomputed | copy | none (orpo and simpo: "
                                                        "none, which auto also means for them)")
    prompt: str = Field("prompt", min_length=1, description="the column of the prompt (text or chat messages)")
    chosen: str = Field("chosen", min_length=1)
    rejected: str = Field("rejected", min_length=1)
    completion: str = Field("completion", min_length=1, description="unpaired rows (kto): the answer's column")
    label: str = Field("label", min_length=1, description="unpaired rows (kto): true when the answer is desirable")
    prompts: Literal["auto", "text", "chat"] = Field("auto", description="the prompts' shape (filled from the data; recorded in manifests)")

    @model_validator(mode="after")
    def _reference_fits(self) -> PreferenceOptions:
        uses = self.objective.uses_reference
        if not uses and self.reference not in ("auto", "none"):
            raise ValueError(f"reference: {self.objective.name} needs no reference model; remove reference")
        if uses and self.reference == "none":
            raise ValueError(f"reference: {self.objective.name} compares with a reference; use auto, adapter_off, "
                             f"precomputed or copy")
        return self


# -- the task ---------------------------------------------------------------------------------


class Preference(Task):
    """Pairs (or, for KTO, single answers marked desirable or not) on a language-model head;
    the loss is the chosen objective over the answers' summed log-probabilities."""

    Options = PreferenceOptions
    head: ClassVar[Head] = "lm"
    labels = None
    generates = True
    reports_preferences: ClassVar[bool] = True  # fills the values the preference evaluator reads

    def __init__(self, options: PreferenceOptions, name: str) -> None:
        self.type = name
        self.options = options
        self.objective = options.objective
        self.reference = options.reference if options.objective.uses_reference else "none"
        self.shapes: Counter[str] = Counter()
        self.chat = Chat(ChatOptions(**options.model_dump(include=set(TemplateOptions.model_fields)),
                                     format="openai", last_turn_only=True), "chat")

    # -- rows ---------------------------------------------------------------------------

    def required_fields(self) -> set[str]:
        """Rows are checked by ``normalize`` (their shape varies); none is required as such."""
        return set()

    def check_columns(self, columns: list[str]) -> list[str]:
        o = self.options
        paired = o.chosen in columns and o.rejected in columns
        unpaired = o.completion in columns and o.label in columns
        if paired or (unpaired and not o.objective.paired):
            return []
        if unpaired:
            return [f"objective: {o.objective.name} needs pairs ({o.chosen!r} and {o.rejected!r} columns); the data has "
                    f"unpaired rows ({o.completion!r}, {o.label!r}): use objective kto, or rename columns"]
        need = f"{o.chosen!r} and {o.rejected!r}" + ("" if o.objective.paired else f" (or {o.completion!r} and {o.label!r})")
        return [f"chosen: the data needs columns {need} (columns: {', '.join(columns) or 'none'}); "
                f"set task.chosen/task.rejected or rename them with data.options.columns"]

    def normalize(self, example: Example) -> Example:
        """One canonical row: ``{prompt, chosen, rejected}`` or ``{prompt, completion, desirable}``,
        the prompt a string or a list of messages, each answer a string."""
        o = self.options
        if example.get(o.chosen) is not None and example.get(o.rejected) is not None:
            prompt, chosen, rejected = self.read_pair(example)
            self.shapes["pairs with chat prompts" if isinstance(prompt, list) else "text pairs"] += 1
            self._saw(prompt)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if example.get(o.completion) is not None and o.label in example:
            if o.objective.paired:
                raise DataError(f"an unpaired row ({o.completion!r}, {o.label!r}) and objective {o.objective.name} "
                                f"needs pairs; use objective kto")
            prompt = self._prompt(example)
            self.shapes["unpaired answers"] += 1
            self._saw(prompt)
            return {"prompt": prompt, "completion": _answer(example[o.completion], o.completion, prompt),
                    "desirable": _flag(example[o.label], o.label)}
        raise DataError(f"neither a pair ({o.chosen!r}, {o.rejected!r}) nor an unpaired answer ({o.completion!r}, "
                        f"{o.label!r}) (keys: {', '.join(map(str, example)) or 'none'})")

    def _saw(self, prompt: Any) -> None:
        """Record whether the prompts are chat messages (``prompts``): a host then renders chat
        requests with the template, or, for text prompts, uses the last user message as the
        prompt, as training saw it. Chat wins when a split has both."""
        if self.options.prompts != "chat":
            shape = "chat" if isinstance(prompt, list) else "text"
            if shape != self.options.prompts:
                self.options = self.options.model_copy(update={"prompts": shape})

    def _prompt(self, example: Example) -> str | list[dict[str, str]]:
        prompt = example.get(self.options.prompt)
        if isinstance(prompt, list):
            return check_messages(prompt, where=self.options.prompt)
        if not isinstance(prompt, str):
            raise DataError(f"{self.options.prompt!r} must be text or a list of chat messages, "
                            f"not {type(prompt).__name__}" if prompt is not None else f"no {self.options.prompt!r}")
        return prompt

    def read_pair(self, example: Example) -> tuple[Any, str, str]:
        o = self.options
        chosen, rejected = example[o.chosen], example[o.rejected]
        if o.prompt not in example and isinstance(chosen, list) and isinstance(rejected, list):
            return _split_conversations(check_messages(chosen, where=o.chosen), check_messages(rejected, where=o.rejected))
        prompt = self._prompt(example)
        return prompt, _answer(chosen, o.chosen, prompt), _answer(rejected, o.rejected, prompt)

    def notes(self) -> list[str]:
        if not self.shapes:
            return []
        return [f"preference: {', '.join(f'{n} {what}' for what, n in self.shapes.most_common())}; "
                f"objective {self.objective.name}"]

    def setup(self, train: list[Example]) -> None:
        """Nothing to learn from the data."""

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Chat prompts render with the template resolved here (recorded in :meth:`to_dict`).
        A base without a chat template is fine for text pairs: the first message prompt
        then fails with the chat task's one-line error."""
        try:
            self.chat.bind_tokenizer(tokenizer)
        except DataError:
            if self.options.template != "tokenizer":
                raise
            return
        self.options = self.options.model_copy(update={k: getattr(self.chat.options, k)
                                                       for k in ("template_text", "template_sha256")})

    # -- encoding -----------------------------------------------------------------------

    def encode(self, example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        """The first answer as ``input_ids``/``labels`` (the chosen one, or the unpaired one),
        the rejected one as ``rejected_input_ids``/``rejected_labels`` (empty for an unpaired
        row), ``desirable`` and the prompt's length. A pair too long for ``max_length`` keeps
        the end of its prompt and the start of each answer."""
        if "completion" in example:
            answers, desirable = [example["completion"]], int(bool(example["desirable"]))
        else:
            answers, desirable = [example["chosen"], example["rejected"]], 1
        prompt_ids, encoded = self.encode_answers(example["prompt"], answers, tokenizer)
        prompt_ids, encoded = fit_pair(prompt_ids, encoded, max_length)
        first = encoded[0]
        second = encoded[1] if len(encoded) > 1 else []
        return {"input_ids": prompt_ids + first, "labels": [IGNORE_INDEX] * len(prompt_ids) + first,
                "rejected_input_ids": prompt_ids + second if second else [],
                "rejected_labels": [IGNORE_INDEX] * len(prompt_ids) + second if second else [],
                "desirable": [desirable], "prompt_length": [len(prompt_ids)]}

    def encode_answers(self, prompt: Any, answers: list[str], tokenizer: Any) -> tuple[list[int], list[list[int]]]:
        """The prompt's ids and each answer's ids after it."""
        if isinstance(prompt, list):
            prompt_ids = self.chat.encode_chat(prompt, tokenizer)
            fulls = []
            for answer in answers:
                row = self.chat.encode({"messages": [*prompt, {"role": "assistant", "content": answer}]}, tokenizer, 10**9)
                first = next((i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX), len(row["labels"]))
                fulls.append((row["input_ids"], first))
            start = min(min(_common_prefix(prompt_ids, ids), first) for ids, first in fulls)
            return prompt_ids[:start], [ids[start:] for ids, _ in fulls]
        prompt_ids = tokenizer(prompt)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        fulls = [tokenizer(prompt + answer)["input_ids"] + eos for answer in answers]
        start = min(_common_prefix(prompt_ids, ids) for ids in fulls)
        return prompt_ids[:start], [ids[start:] for ids in fulls]

    def collate(self, rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        """Every answer of the batch as one right-padded sequence (pairs: the ``B`` chosen then
        the ``B`` rejected, as TRL concatenates them), ``desirable`` per sequence, and for
        KTO the mismatched sequences (prompt ``i`` with the answer of row ``i + 1``) its KL
        estimate reads."""
        import torch

        sequences = [(r["input_ids"], r["labels"]) for r in rows]
        sequences += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows if r["rejected_input_ids"]]
        desirable = [r["desirable"][0] for r in rows] + [0 for r in rows if r["rejected_input_ids"]]
        batch = pad_sequences(sequences, pad_id)
        batch["desirable"] = torch.tensor(desirable, dtype=torch.long)
        batch["pairs"] = torch.tensor([bool(r["rejected_input_ids"]) for r in rows], dtype=torch.bool)
        if not self.objective.paired:
            mismatched = []
            for i, row in enumerate(rows):
                other = rows[(i + 1) % len(rows)]
                n, m = row["prompt_length"][0], other["prompt_length"][0]
                answer = other["input_ids"][m:]
                mismatched.append((row["input_ids"][:n] + answer, [IGNORE_INDEX] * n + answer))
            batch.update({f"kl_{k}": v for k, v in pad_sequences(mismatched, pad_id).items()})
        return batch

    # -- the objective ------------------------------------------------------------------

    def reference_scores(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row: the reference's summed log-probabilities of its answers ``[first, second]``
        (second 0 for an unpaired row), and for KTO of its mismatched sequence too."""
        import torch

        logps, _ = answer_log_probs(model, _sequences(batch))
        per_row = _per_row(logps, batch["pairs"])
        if self.objective.paired:
            return per_row
        kl, _ = answer_log_probs(model, _sequences(batch, "kl_"))
        return torch.cat([per_row, kl[:, None]], dim=1)

    def _scores(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The policy's log-probabilities (with their graph) and the per-answer terms every
        objective and metric is built from."""
        logps, counts = answer_log_probs(model, _sequences(batch))
        out = {"logps": logps, "counts": counts, "desirable": batch["desirable"].bool()}
        if self.objective.uses_reference:
            reference = batch.get("reference")
            if reference is None:
                raise DataError("no reference scores for this batch (evaluating rows that were not scored by the base)")
            ref = _per_sequence(reference[:, :2].to(logps.device), batch["pairs"])
            out["ratios"] = logps - ref
            out["rewards"] = self.objective.beta * out["ratios"].detach()
            if not self.objective.paired:
                import torch

                with torch.no_grad():
                    kl, _ = answer_log_probs(model, _sequences(batch, "kl_"))
                out["kl"] = (kl - reference[:, 2].to(kl.device)).mean().clamp(min=0)
        else:
            out["rewards"] = self.objective.beta * (logps / counts.clamp(min=1)).detach()
        return out

    def _per_sequence_loss(self, s: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's loss per pair (paired objectives) or per answer (KTO)."""
        import torch
        import torch.nn.functional as F

        o, n = self.objective, int(batch["pairs"].sum())
        if o.name == "kto":
            toward = torch.where(s["desirable"], s["ratios"] - s["kl"], s["kl"] - s["ratios"])
            weight = torch.where(s["desirable"], o.desirable_weight, o.undesirable_weight)
            return weight * (1 - torch.sigmoid(o.beta * toward))
        chosen, rejected = s["logps"][:n], s["logps"][n:]
        if o.name in WITHOUT_REFERENCE:
            mean_c, mean_r = chosen / s["counts"][:n].clamp(min=1), rejected / s["counts"][n:].clamp(min=1)
            if o.name == "simpo":
                return -F.logsigmoid(o.beta * (mean_c - mean_r) - o.gamma)
            log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
            return -chosen / s["counts"][:n].clamp(min=1) - o.beta * F.logsigmoid(log_odds)
        if o.name == "ipo":
            c, r = s["counts"][:n].clamp(min=1), s["counts"][n:].clamp(min=1)
            return (s["ratios"][:n] / c - s["ratios"][n:] / r - 1 / (2 * o.beta)) ** 2
        delta = s["ratios"][:n] - s["ratios"][n:]
        if o.name == "hinge":
            return torch.relu(1 - o.beta * delta)
        eps = o.label_smoothing
        return -(1 - eps) * F.logsigmoid(o.beta * delta) - eps * F.logsigmoid(-o.beta * delta)

    def _sft(self, s: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The chosen (desirable) answers' cross-entropy, mean over their tokens."""
        chosen = s["desirable"]
        return -s["logps"][chosen].sum() / s["counts"][chosen].sum().clamp(min=1)

    def training_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TaskLoss:
        s = self._scores(model, batch)
        loss = self._per_sequence_loss(s, batch).mean()
        terms = {}
        if self.objective.sft_weight:
            sft = self._sft(s, batch)
            loss = loss + self.objective.sft_weight * sft
            terms["sft/loss"] = float(sft.detach())
        terms.update(_step_terms(s, batch))
        return TaskLoss(loss, int(batch["attention_mask"].sum()), terms)

    def evaluate_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> EvalBatch:
        """Per row: ``values`` ``chosen_logp``/``rejected_logp`` (summed over the answer) and
        ``chosen_reward``/``rejected_reward`` (NaN where a row has no such answer); the
        prediction is whether the chosen answer's reward is higher (1) or not (0)."""
        s = self._scores(model, batch)
        losses = self._per_sequence_loss(s, batch).float()
        values = _row_values(s, batch)
        pairs = batch["pairs"].tolist()
        desirable = batch["desirable"][: len(pairs)].tolist()
        predictions = [int(c > r) if p else int(int((c if d else r) > 0) == d)  # unpaired: the reward's sign is right
                       for c, r, p, d in zip(values["chosen_reward"], values["rejected_reward"], pairs, desirable)]
        per_row = losses.tolist()
        if len(per_row) != len(pairs):  # KTO: one loss per answer; a row's is its answers' mean
            per_row = _per_row(losses, batch["pairs"]).nan_to_num(0).tolist()
            per_row = [(a + b) / 2 if p else a for (a, b), p in zip(per_row, pairs)]
        return EvalBatch(predictions, [1] * len(pairs), float(sum(per_row)), len(pairs), scores=values["chosen_reward"],
                         losses=per_row, values=values)

    # -- generation and serving ---------------------------------------------------------

    def encode_prompt(self, example: Example, tokenizer: Any) -> list[int]:
        prompt = example["prompt"] if "prompt" in example else self.normalize(example)["prompt"]
        return self._prompt_ids(prompt, tokenizer)

    def _prompt_ids(self, prompt: Any, tokenizer: Any) -> list[int]:
        if isinstance(prompt, list):
            return self.chat.encode_chat(prompt, tokenizer)
        return tokenizer(prompt)["input_ids"]

    def reference_text(self, example: Example) -> str | None:
        row = example if "prompt" in example else self.normalize(example)
        return (row.get("chosen") or (row.get("completion") if row.get("desirable") else None) or "").strip() or None

    def format_prompt(self, text: str) -> str | None:
        return None

    def encode_chat(self, messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
        """A chat request as training saw prompts: rendered with the chat template for an
        adapter trained on message prompts, the last user message as it is for one trained on
        text prompts."""
        if self.options.prompts != "text":
            return self.chat.encode_chat(messages, tokenizer)
        users = [m for m in check_messages(messages) if m["role"] == "user"]
        if not users:
            raise DataError("this adapter was trained on text prompts and answers the last user message; send one")
        return self._prompt_ids(users[-1]["content"], tokenizer)

    def end_of_turn_ids(self, tokenizer: Any) -> set[int]:
        if self.options.prompts == "text":
            return set()
        try:
            return self.chat.end_of_turn_ids(tokenizer)
        except DataError:  # no template to read one from (a base without one, text prompts)
            return set()

    # -- identity -----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.options.model_dump(mode="json"), "objective": self.objective.recorded()}


# -- helpers ----------------------------------------------------------------------------------


def _answer(value: Any, column: str, prompt: Any) -> str:
    """An answer as text: a string, or a one-message list of the assistant's answer."""
    if isinstance(value, list):
        messages = check_messages(value, where=column)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"{column!r}: an answer given as messages is one assistant message "
                            f"(got {len(messages)}: {', '.join(m['role'] for m in messages)})")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{column!r} must be text or one assistant message, not {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{column!r} is empty")
    if isinstance(prompt, list) and value != value.strip():
        value = value.strip()
    return value


def _flag(value: Any, column: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "desirable", "good"}:
        return True
    if text in {"0", "false", "no", "undesirable", "bad"}:
        return False
    raise DataError(f"{column!r} is {value!r}; use true/false (or 1/0) for a desirable/undesirable answer")


def _split_conversations(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> tuple[list[dict[str, str]], str, str]:
    """Two whole conversations sharing a prompt: the shared messages, then each last answer."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    tails = chosen[shared:], rejected[shared:]
    if shared == 0 or any(len(t) != 1 or t[0]["role"] != "assistant" for t in tails):
        raise DataError("chosen and rejected conversations must share every message but the last, an assistant answer "
                        "(or give a separate prompt column)")
    return chosen[:shared], tails[0][0]["content"], tails[1][0]["content"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fit_pair(prompt: list[int], answers: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Cut a row to ``max_length`` tokens: the prompt loses its start, down to half the
    length, then the answers lose their ends (every answer keeps at least one token)."""
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= max_length:
        return prompt, answers
    keep_prompt = max(min(len(prompt), max_length - longest), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt:]
    room = max(1, max_length - len(prompt))
    return prompt, [a[:room] for a in answers]


def pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (S, T)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(labs)] = torch.tensor(labs)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _sequences(batch: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")}


def _per_row(values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Per-sequence ``values`` (rows' first answers, then the pairs' second ones) as
    ``(B, 2)``: a row's first and second answer, 0 where a row has no second one."""
    import torch

    first = values[: pairs.numel()]
    second = values.new_zeros(pairs.numel())
    second[pairs.to(values.device)] = values[pairs.numel():]
    return torch.stack([first, second], dim=1)


def _per_sequence(per_row: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_per_row`: ``(B, 2)`` back to one value per sequence."""
    import torch

    return torch.cat([per_row[:, 0], per_row[:, 1][pairs.to(per_row.device)]])


def _row_values(s: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per row: the chosen and rejected answers' summed log-probabilities and rewards (NaN
    where a row has no such answer: an unpaired row has one of the two)."""
    import torch

    pairs, desirable = batch["pairs"], s["desirable"][: batch["pairs"].numel()]
    out = {}
    for key, values in (("logp", s["logps"].detach()), ("reward", s["rewards"])):
        per_row = _per_row(values.float(), pairs)
        nan = torch.full_like(per_row[:, 0], float("nan"))
        chosen = torch.where(pairs | desirable, per_row[:, 0], nan)
        rejected = torch.where(pairs, per_row[:, 1], torch.where(desirable, nan, per_row[:, 0]))
        out[f"chosen_{key}"], out[f"rejected_{key}"] = chosen.tolist(), rejected.tolist()
    return out


def _step_terms(s: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """What a training step logs, as TRL names it: the mean rewards, their margin and how
    often the chosen one wins, and the answers' mean summed log-probabilities."""
    values = _row_values(s, batch)
    terms = {}
    for key in ("chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp"):
        present = [v for v in values[key] if not math.isnan(v)]
        if present:
            kind, side = key.split("_")[1], key.split("_")[0]
            terms[f"{'rewards' if kind == 'reward' else 'logps'}/{side}"] = sum(present) / len(present)
    both = [(c, r) for c, r in zip(values["chosen_reward"], values["rejected_reward"]) if not (math.isnan(c) or math.isnan(r))]
    if both:
        terms["rewards/margin"] = sum(c - r for c, r in both) / len(both)
        terms["rewards/accuracy"] = sum(c > r for c, r in both) / len(both)
    return terms


@hookimpl
def register_tasks(register: Any) -> None:
    register("preference", Preference)
