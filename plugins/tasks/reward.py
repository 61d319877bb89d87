"""``reward``: a reward model, one scalar score per text, trained on preference pairs.

A sequence-classification head with one output (``labels: [score]``) scores the whole
conversation, prompt and answer together; training pushes the chosen answer's score above
the rejected one's with the pairwise Bradley–Terry loss, as TRL's ``RewardTrainer``:

    -log σ(r_chosen - r_rejected - margin)  +  c · mean((r_chosen + r_rejected)²)

``margin`` is a per-row number from the ``margin`` column (0 where a row has none), and ``c``
is ``center_rewards_coefficient`` (off unless set), which keeps the scores centred on 0.

Rows are the ``preference`` task's pairs, read by its own code: ``{prompt, chosen, rejected}``
with the prompt as text or as chat messages, or ``{chosen, rejected}`` as two whole
conversations that differ in their last assistant message. A text pair is scored as
``prompt + answer`` tokenized, followed by the end-of-sequence token (as TRL adds it); a
chat pair as the conversation rendered with the chat template (``template``). A host scores
a text the same way (:meth:`Reward.encode_scored`, :class:`~plugtune.sdk.ScoresTexts`):
``AdapterHost.score``, ``plugtune classify`` and the server's ``/v1/classify`` return the
score, not class probabilities.

Evaluation fills ``chosen_reward``/``rejected_reward`` per row, so the ``preference``
evaluator reports how often the chosen answer wins (``preference/accuracy``) and the mean
margin; ``accuracy`` reads the same win rate and ``loss`` the Bradley–Terry loss.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from plugtune import hookimpl
from plugtune.plugins.tasks.chat import TemplateOptions
from plugtune.plugins.tasks.preference import Preference, PreferenceOptions, fit_pair, pad_sequences
from plugtune.sdk import DataError, EvalBatch, Example, Head, Task, TaskLoss, check_messages

if TYPE_CHECKING:
    import torch

MARGIN_SCALE = 10**6  # an encoded row keeps its margin as an integer of millionths (the token cache holds ints)
SCORE_LABEL = "score"


class RewardOptions(TemplateOptions):
    prompt: str = Field("prompt", min_length=1, description="the column of the prompt (text or chat messages)")
    chosen: str = Field("chosen", min_length=1)
    rejected: str = Field("rejected", min_length=1)
    margin: str = Field("margin", min_length=1, description="the column of a per-row margin the chosen score must win "
                                                            "by (read when present; 0 otherwise)")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="c in c·mean((r_chosen + r_rejected)²), "
                                                                            "which keeps scores near 0 (off when unset)")


class Reward(Task):
    """Pairs of answers on a one-output classifier head; the loss is Bradley–Terry over the
    two scores."""

    Options = RewardOptions
    head: ClassVar[Head] = "classifier"
    generates: ClassVar[bool] = False
    reference: ClassVar[str] = "none"  # ComputesLoss: no reference model
    reports_preferences: ClassVar[bool] = True  # fills the values the preference evaluator reads

    def __init__(self, options: RewardOptions, name: str) -> None:
        self.type = name
        self.options = options
        self.labels = [SCORE_LABEL]
        # The preference task reads and encodes the pairs; its objective is never used here.
        fields = options.model_dump(include=set(TemplateOptions.model_fields) | {"prompt", "chosen", "rejected"})
        self.pairs = Preference(PreferenceOptions.model_construct(**fields), "preference")

    # -- rows ---------------------------------------------------------------------------

    def required_fields(self) -> set[str]:
        """Rows are checked by ``normalize`` (the prompt column is optional)."""
        return set()

    def check_columns(self, columns: list[str]) -> list[str]:
        o = self.options
        if o.chosen in columns and o.rejected in columns:
            return []
        return [f"chosen: a reward model trains on pairs; the data needs columns {o.chosen!r} and {o.rejected!r} "
                f"(columns: {', '.join(columns) or 'none'}); set task.chosen/task.rejected or rename them with "
                f"data.options.columns"]

    def normalize(self, example: Example) -> Example:
        """``{prompt, chosen, rejected, margin}``: the prompt a string or a list of messages,
        each answer a string, the margin a float."""
        o = self.options
        missing = [c for c in (o.chosen, o.rejected) if example.get(c) is None]
        if missing:
            raise DataError(f"a reward model trains on pairs, and this row has no {missing[0]!r} answer "
                            f"(keys: {', '.join(map(str, example)) or 'none'}); drop the row or fill it in")
        prompt, chosen, rejected = self.pairs.read_pair(example)
        self.pairs.shapes["pairs with chat prompts" if isinstance(prompt, list) else "text pairs"] += 1
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": _margin(example.get(o.margin), o.margin)}

    def notes(self) -> list[str]:
        shapes = self.pairs.shapes
        return [f"reward: {', '.join(f'{n} {what}' for what, n in shapes.most_common())}"] if shapes else []

    def setup(self, train: list[Example]) -> None:
        """Nothing to learn from the data: the one label is the score."""

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Chat pairs render with the template resolved here (recorded in :meth:`to_dict`)."""
        self.pairs.bind_tokenizer(tokenizer)
        update = {k: getattr(self.pairs.options, k, None) for k in ("template_text", "template_sha256")}
        if update["template_text"] is not None:
            self.options = self.options.model_copy(update=update)

    # -- encoding -----------------------------------------------------------------------

    def encode(self, example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        """The chosen conversation as ``input_ids``, the rejected one as
        ``rejected_input_ids`` (prompt and answer each; cut as the preference task cuts a
        pair), ``labels`` ``[0]`` (the score) and the margin in millionths."""
        row = example if "chosen" in example and "rejected" in example else self.normalize(example)
        prompt_ids, answers = self.pairs.encode_answers(row["prompt"], [row["chosen"], row["rejected"]], tokenizer)
        prompt_ids, answers = fit_pair(prompt_ids, answers, max_length)
        margin = float(row.get("margin") or 0.0)
        return {"input_ids": prompt_ids + answers[0], "rejected_input_ids": prompt_ids + answers[1], "labels": [0],
                "margin": [round(margin * MARGIN_SCALE)]}

    def encode_scored(self, item: str | list[dict[str, str]], tokenizer: Any, max_length: int) -> list[int]:
        """The ids a host scores for one input, as training encoded a pair's answer: a text
        tokenized with the end-of-sequence token after it (a text ending an answer), a
        conversation (ending with the assistant's answer) in the chat template."""
        if isinstance(item, list):
            messages = check_messages(item)
            if messages[-1]["role"] != "assistant":
                raise DataError("a reward model scores an answer: the conversation must end with an assistant message")
            ids = self.pairs.chat.encode({"messages": messages}, tokenizer, 10**9)["input_ids"]
        elif isinstance(item, str):
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids = tokenizer(item)["input_ids"] + eos
        else:
            raise DataError(f"a reward model scores text or a list of chat messages, not {type(item).__name__}")
        return ids[:max_length]

    def collate(self, rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        """The ``B`` chosen then the ``B`` rejected sequences, right-padded together
        (``(2B, T)``), and ``margin`` ``(B,)``."""
        import torch

        sequences = [(r["input_ids"], []) for r in rows] + [(r["rejected_input_ids"], []) for r in rows]
        batch = pad_sequences(sequences, pad_id)
        del batch["labels"]
        batch["margin"] = torch.tensor([r["margin"][0] / MARGIN_SCALE for r in rows], dtype=torch.float32)
        return batch

    # -- the objective (ComputesLoss) ---------------------------------------------------

    def reference_scores(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError("a reward model has no reference")  # reference is "none": never called

    def _rewards(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and the rejected sequences' scores, ``(B,)`` each, in fp32."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, 1)
        rewards = logits.float().squeeze(-1)
        n = rewards.numel() // 2
        return rewards[:n], rewards[n:]

    def _per_pair(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        return -F.logsigmoid(chosen - rejected - batch["margin"].to(chosen.device))

    def training_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TaskLoss:
        chosen, rejected = self._rewards(model, batch)
        loss = self._per_pair(chosen, rejected, batch).mean()
        c = self.options.center_rewards_coefficient
        if c:
            loss = loss + c * ((chosen + rejected) ** 2).mean()
        c_d, r_d = chosen.detach(), rejected.detach()
        terms = {"rewards/chosen": float(c_d.mean()), "rewards/rejected": float(r_d.mean()),
                 "rewards/margin": float((c_d - r_d).mean()), "rewards/accuracy": float((c_d > r_d).float().mean())}
        return TaskLoss(loss, int(batch["attention_mask"].sum()), terms)

    def evaluate_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> EvalBatch:
        """Per row: ``values`` ``chosen_reward``/``rejected_reward`` (the two scores); the
        prediction is whether the chosen one is higher (1) or not (0); the loss is the
        Bradley–Terry term (margin included, centring not)."""
        chosen, rejected = self._rewards(model, batch)
        losses = self._per_pair(chosen, rejected, batch).tolist()
        c, r = chosen.tolist(), rejected.tolist()
        return EvalBatch([int(a > b) for a, b in zip(c, r)], [1] * len(c), float(sum(losses)), len(c), scores=c,
                         losses=losses, values={"chosen_reward": c, "rejected_reward": r})

    def eval_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalBatch:
        """Not used: evaluation runs :meth:`evaluate_batch`, which runs the model itself."""
        raise NotImplementedError("the reward task evaluates with evaluate_batch")

    # -- generation and serving ---------------------------------------------------------

    def encode_prompt(self, example: Example, tokenizer: Any) -> list[int]:
        row = example if "chosen" in example and "rejected" in example else self.normalize(example)
        return self.encode(row, tokenizer, 10**9)["input_ids"]

    def reference_text(self, example: Example) -> str | None:
        return None

    def format_prompt(self, text: str) -> str | None:
        return None

    # -- identity -----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.options.model_dump(mode="json")}


def _margin(value: Any, column: str) -> float:
    if value is None or value == "":
        return 0.0
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{column!r} is {value!r}; a margin is a number (or leave it empty for 0)") from None
    if not math.isfinite(margin):
        raise DataError(f"{column!r} is {value!r}; a margin is a finite number")
    return margin


@hookimpl
def register_tasks(register: Any) -> None:
    register("reward", Reward)
