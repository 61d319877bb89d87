"""Evaluation: one pass over a split feeds every evaluator.

For each batch the core runs one forward pass and hands every evaluator an
:class:`~plugtune.kernel.components.EvalBatch` (per-example predictions, references, scores and the
summed loss). Two optional extras, computed only when an evaluator asks for them:

* ``needs_generation = True`` on an evaluator class: for tasks that generate (an lm head
  with a reference text) the core also generates greedily from each prompt and fills ``EvalBatch.generated`` and
  ``EvalBatch.reference_texts`` (summarization, QA, translation metrics).
* ``compute_with(context)`` on an evaluator: called after the pass with an
  :class:`~plugtune.kernel.components.EvalContext` whose ``predict(examples)`` runs the model on
  any examples the evaluator makes up (counterfactual rewrites, for instance).
"""

from __future__ import annotations

from typing import Any

import torch

from plugtune.kernel.components import EvalBatch, EvalContext, EvalMetrics
from plugtune.data.encoding import Row, batches, encode_split
from plugtune.data.tasks import Task

@torch.no_grad()
def generate_responses(model: torch.nn.Module, examples: list[dict[str, Any]], task: Task, tokenizer: Any,
                       device: torch.device, max_new_tokens: int) -> list[str]:
    """Greedy continuations of each example's prompt (left-padded batch)."""
    prompts = [task.encode_prompt(e, tokenizer) for e in examples]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (B, T)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, **_stopping(model, task, tokenizer))
    return [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def _stopping(model: torch.nn.Module, task: Task, tokenizer: Any) -> dict[str, Any]:
    """``eos_token_id`` for ``generate`` when the task ends turns with tokens of its own
    (a chat template's ``<|im_end|>`` on a base whose EOS differs): the model's EOS ids
    plus those; nothing otherwise (the generation config decides)."""
    ends = getattr(task, "end_of_turn_ids", None)
    extra = set(ends(tokenizer)) if ends is not None else set()
    if not extra:
        return {}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return {"eos_token_id": sorted(set(eos) | extra)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: list[Row], task: Task, evaluators: list[Any], *, batch_size: int,
             pad_id: int, device: torch.device, tokenizer: Any = None, max_new_tokens: int = 32,
             max_length: int = 256, logits_on_labels_only: bool = False) -> EvalMetrics:
    """Run every evaluator over ``rows``; returns the merged metrics, with the evaluators'
    structured ``details()`` (no directions: the caller knows the recipe's). With
    ``logits_on_labels_only`` a causal LM's head runs at the label positions only
    (core/loss.py); the metrics are the same."""
    from plugtune.training.loss import eval_batch_at_labels, output_head

    was_training = model.training
    model.eval()
    for ev in evaluators:
        ev.reset()
    generate = (task.head == "lm" and task.generates and tokenizer is not None
                and any(getattr(ev, "needs_generation", False) for ev in evaluators))

    head = output_head(model) if logits_on_labels_only and task.head == "lm" else None
    own = getattr(task, "evaluate_batch", None)

    def run(chunk: list[Row], batch: dict[str, torch.Tensor]) -> EvalBatch:
        batch = {k: v.to(device) for k, v in batch.items()}
        if own is not None:  # a task that runs the model itself (ComputesLoss)
            result = own(model, batch)
        elif head is not None:
            result = eval_batch_at_labels(model, head, batch)
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            result = task.eval_batch(logits, batch)
        result.examples = [r["example"] for r in chunk]
        return result

    for chunk, batch in batches(rows, batch_size, pad_id, task):
        result = run(chunk, batch)
        if generate:
            result.generated = generate_responses(model, result.examples, task, tokenizer, device, max_new_tokens)
            result.reference_texts = [task.reference_text(e) or "" for e in result.examples]
        for ev in evaluators:
            ev.update(result)

    def predict(examples: list[dict[str, Any]]) -> EvalBatch:
        """The model's predictions and scores for arbitrary examples, in order."""
        encoded, _ = encode_split(examples, task, tokenizer, max_length, "rewritten")
        merged = EvalBatch([], [], 0.0, 0, scores=[], losses=[])
        for chunk, batch in batches(encoded, batch_size, pad_id, task):
            part = run(chunk, batch)
            merged.predictions += part.predictions
            merged.references += part.references
            merged.scores += part.scores
            merged.losses += part.losses
            merged.examples += part.examples
            merged.loss_sum += part.loss_sum
            merged.n_targets += part.n_targets
            for key, values in part.values.items():
                merged.values.setdefault(key, []).extend(values)
        return merged

    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    context = EvalContext(examples=[r["example"] for r in rows], task=task, predict=predict)
    for ev in evaluators:
        metrics.update(ev.compute())
        if hasattr(ev, "compute_with"):
            metrics.update(ev.compute_with(context))
        if hasattr(ev, "details"):
            details.update(ev.details())
    model.train(was_training)
    return EvalMetrics(metrics, details=details)
