"""Regularizers that act on the model and the training step: dropout, label smoothing,
gradient clipping, L2-SP, NEFTune and early stopping.

Which to reach for, and why:

``dropout``
    Set the dropout probabilities of the base model (attention probabilities and hidden
    states) and of the LoRA input. Use it when a small training set is memorised quickly:
    most pretrained encoders ship with 0.1, decoders such as Llama with 0.0. The frozen
    base's dropout still acts on the activations the adapter learns from.
``label_smoothing``
    Train against ``(1 - epsilon) * one-hot + epsilon * uniform``. Use it when the model
    becomes over-confident (train loss near zero, dev loss rising while dev accuracy holds):
    it caps how peaked the predicted distribution gets and usually improves calibration.
    Works for classification and for causal LMs (on the response tokens).
``grad_clip``
    Clip the global norm of the trainable gradients. Use it when training spikes or diverges
    (high learning rates, tiny batches, fp16); it logs the pre-clip norm so you can see how
    often it acts and pick ``max_norm`` from the log.
``l2sp``
    Pull the trainable weights back toward their starting point (L2-SP, Li et al. 2018):
    ``strength / 2 * sum ||w - w0||^2``. For LoRA the starting update is zero (``lora_B`` is
    initialised to zeros), so this keeps the low-rank *delta* small rather than the weights;
    for full fine-tuning it anchors at the pretrained weights. Unlike ``weight_decay`` it
    never pulls a pretrained or randomly initialised weight toward zero. Use it when the
    fine-tuned model drifts too far from the base (forgets, overfits a small set).
``neftune``
    Add uniform noise of scale ``alpha / sqrt(L * d)`` to the input embeddings while training
    (NEFTune, Jain et al. 2023), never at evaluation. Use it for instruction tuning of causal
    LMs on small data; it is a cheap, strong regularizer there.
``early_stopping``
    Watch an evaluation metric (needs ``training.eval_every``), keep the best weights and stop
    after ``patience`` evaluations without improvement. The saved adapter and its
    ``metrics.after`` are the best evaluation's. Use it whenever you train for several epochs
    and cannot tell in advance when the model starts to overfit. The metric is measured on
    the recipe's test split, so that split is then used for model selection too.

All of them log what they did every step as ``<name>/<key>`` in ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions, Decision, EvalMetrics, MetricDirections

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


# -- dropout -----------------------------------------------------------------------------


class DropoutOptions(ComponentOptions):
    attention: float | None = Field(None, ge=0, lt=1, description="dropout on attention probabilities; null leaves the model's")
    hidden: float | None = Field(None, ge=0, lt=1, description="dropout on hidden states (embeddings, residual branches, head); null leaves the model's")
    adapter: float | None = Field(None, ge=0, lt=1, description="dropout on the LoRA input (peft lora_dropout); null leaves the method's")


def _is_attention_dropout(name: str, parent: Any) -> bool:
    """Attention-probability dropout vs hidden-state dropout, from the module's attribute name
    and its parent's class: ``attn_dropout``/``attention_dropout`` anywhere, or a plain
    ``dropout`` owned by an attention module (BERT's ``BertSelfAttention.dropout``) — but not
    a ``resid_dropout`` or the dropout of an attention *output* block (``BertSelfOutput``)."""
    attr = name.rsplit(".", 1)[-1].lower()
    if "attn" in attr or "attention" in attr:
        return True
    cls = type(parent).__name__.lower()
    return attr == "dropout" and "attention" in cls and "output" not in cls


class Dropout:
    """Sets dropout probabilities on the prepared model (see the module docstring)."""

    Options = DropoutOptions

    def __init__(self, options: DropoutOptions) -> None:
        self.options = options
        self.applied: dict[str, float] = {}
        self.counts: dict[str, int] = {"attention": 0, "hidden": 0, "adapter": 0}

    def setup(self, model: torch.nn.Module, task: Any, tokenizer: Any) -> None:
        import torch

        o = self.options
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if "lora_dropout" in name:
                continue
            parent = modules.get(name.rsplit(".", 1)[0], model) if "." in name else model
            if isinstance(module, torch.nn.Dropout):
                kind = "attention" if _is_attention_dropout(name, parent) else "hidden"
                p = o.attention if kind == "attention" else o.hidden
                if p is not None:
                    module.p = p
                    self.counts[kind] += 1
            # Llama, Mistral, Qwen2...: attention dropout is a float used functionally.
            if o.attention is not None and isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = o.attention
                self.counts["attention"] += 1
        config = getattr(model, "config", None)
        if config is not None:
            for key, value in (("attention_dropout", o.attention), ("attention_probs_dropout_prob", o.attention),
                               ("hidden_dropout_prob", o.hidden), ("hidden_dropout", o.hidden)):
                if value is not None and isinstance(getattr(config, key, None), (int, float)):
                    setattr(config, key, value)
        if o.adapter is not None:
            for module in modules.values():
                holder = getattr(module, "lora_dropout", None)
                if isinstance(holder, torch.nn.ModuleDict):
                    for key in list(holder.keys()):
                        if isinstance(holder[key], torch.nn.Dropout):
                            holder[key].p = o.adapter
                        else:  # peft puts an Identity there when the method's dropout is 0
                            holder[key] = torch.nn.Dropout(o.adapter)
                        self.counts["adapter"] += 1
        self.applied = {k: float(v) for k, v in (("attention", o.attention), ("hidden", o.hidden), ("adapter", o.adapter))
                        if v is not None}

    def report(self, model: torch.nn.Module) -> dict[str, float]:
        # The probabilities applied and how many modules took each (0 = the architecture has
        # no such dropout, e.g. hidden dropout on Llama).
        return {**self.applied, **{f"{k}_modules": float(self.counts[k]) for k in self.applied}}


# -- label smoothing ---------------------------------------------------------------------


class LabelSmoothingOptions(ComponentOptions):
    epsilon: float = Field(0.1, ge=0, lt=1, description="weight of the uniform distribution in the target")


def _uniform_ce_and_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over target positions of ``-mean_v log p_v`` (cross-entropy against the uniform
    distribution) and of the usual cross-entropy. Classification: logits (B, C), labels (B,).
    Causal LM: logits (B, T, V), labels (B, T); position t predicts token t+1, -100 ignored."""
    import torch

    logits = logits.float()
    if logits.dim() == 2:
        flat, targets = logits, labels
    else:
        # A prefix method may return more positions than labels: the labels are the last T.
        logits = logits[:, -labels.size(1):]
        flat = logits[:, :-1].reshape(-1, logits.size(-1))  # (B*(T-1), V)
        targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    flat, targets = flat[keep], targets[keep]
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero
    log_z = torch.logsumexp(flat, dim=-1)  # (N,)
    uniform = (log_z - flat.mean(dim=-1)).mean()  # -mean_v log p_v = log Z - mean_v logit_v
    ce = torch.nn.functional.cross_entropy(flat, targets)
    return uniform, ce


class LabelSmoothing:
    """``(1 - epsilon) * CE + epsilon * CE(uniform)``, added as a loss term."""

    Options = LabelSmoothingOptions
    needs_logits = True  # reads outputs.logits (B, T, V): the core keeps full logits

    def __init__(self, options: LabelSmoothingOptions) -> None:
        self.options = options
        self.uniform = 0.0

    def loss_term(self, model: torch.nn.Module, batch: Any, outputs: Any, step: int) -> torch.Tensor | None:
        eps = self.options.epsilon
        if eps == 0:
            return None
        uniform, ce = _uniform_ce_and_ce(outputs.logits, batch["labels"])
        # The core's loss is the model's own CE; subtract that one so the total is exactly
        # (1 - eps) * loss + eps * uniform.
        loss = getattr(outputs, "loss", None)
        base = loss if loss is not None else ce
        self.uniform = float(uniform.detach())
        return eps * uniform - eps * base

    def report(self, model: torch.nn.Module) -> dict[str, float]:
        return {"epsilon": self.options.epsilon, "uniform_ce": self.uniform}


# -- gradient clipping -------------------------------------------------------------------


class GradClipOptions(ComponentOptions):
    max_norm: float = Field(1.0, gt=0, description="largest global L2 norm of the trainable gradients")


class GradClip:
    """Clips the global gradient norm after backward; logs the pre-clip norm.

    The gradients it sees are the ones the optimizer will use; under fp16 autocast they are
    still loss-scaled at that point, so prefer ``training.max_grad_norm`` there (bf16 and fp32
    have no scaler)."""

    Options = GradClipOptions

    def __init__(self, options: GradClipOptions) -> None:
        self.options = options

    def after_backward(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        import torch

        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return {"grad_norm": 0.0, "clipped": 0}
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.options.max_norm))
        return {"grad_norm": norm, "clipped": int(norm > self.options.max_norm)}


# -- L2-SP -------------------------------------------------------------------------------


class L2SPOptions(ComponentOptions):
    strength: float = Field(0.01, ge=0, description="coefficient of strength/2 * sum ||w - w0||^2")


class L2SP:
    """Penalises the distance of the trainable weights from where they started (zero for
    LoRA's ``lora_B`` and any weight initialised to zeros)."""

    Options = L2SPOptions
    needs_logits = False  # its loss term reads the weights only

    def __init__(self, options: L2SPOptions) -> None:
        self.options = options
        self.anchored: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = []  # None: anchored at zero
        self.distance = 0.0

    def setup(self, model: torch.nn.Module, task: Any, tokenizer: Any) -> None:
        self.anchored = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            zero = "lora_B" in name or not bool(p.detach().any())
            self.anchored.append((p, None if zero else p.detach().clone()))

    def _squared_distance(self) -> torch.Tensor:
        import torch

        total = None
        for i, (p, anchor) in enumerate(self.anchored):
            if anchor is not None and (anchor.device != p.device or anchor.dtype != p.dtype):
                anchor = anchor.to(device=p.device, dtype=p.dtype)  # the core moves the model after setup
                self.anchored[i] = (p, anchor)
            diff = p if anchor is None else p - anchor
            part = diff.float().pow(2).sum()
            total = part if total is None else total + part
        return total if total is not None else torch.tensor(0.0)

    def loss_term(self, model: torch.nn.Module, batch: Any, outputs: Any, step: int) -> torch.Tensor | None:
        if not self.anchored or self.options.strength == 0:
            return None
        squared = self._squared_distance()
        self.distance = math.sqrt(float(squared.detach()))
        return 0.5 * self.options.strength * squared

    def report(self, model: torch.nn.Module) -> dict[str, float]:
        import torch

        if self.options.strength == 0 and self.anchored:  # no loss term ran: measure here
            with torch.no_grad():
                self.distance = math.sqrt(float(self._squared_distance()))
        return {"distance": self.distance}


# -- NEFTune -----------------------------------------------------------------------------


class NEFTuneOptions(ComponentOptions):
    alpha: float = Field(5.0, gt=0, description="noise scale: uniform(-1, 1) * alpha / sqrt(L * d)")


class NEFTune:
    """Noisy input embeddings in training mode only (a forward hook on the input embeddings)."""

    Options = NEFTuneOptions
    cannot_pack: ClassVar[str] = ("its noise scale is alpha / sqrt(L * d) with L the row's width, and a packed row is "
                                  "several examples wide, so the noise would shrink")

    def __init__(self, options: NEFTuneOptions) -> None:
        self.options = options
        self.handle: Any = None
        self.scale = 0.0

    def hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        dims = output.size(-2) * output.size(-1)  # L * d: padded length times width
        self.scale = self.options.alpha / math.sqrt(dims)
        return output + _uniform_noise(output, self.scale)

    def setup(self, model: torch.nn.Module, task: Any, tokenizer: Any) -> None:
        embeddings = model.get_input_embeddings()  # a peft wrapper forwards this to the base
        self.handle = embeddings.register_forward_hook(self.hook)

    def report(self, model: torch.nn.Module) -> dict[str, float]:
        return {"noise_scale": self.scale}


def _uniform_noise(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    import torch

    return torch.empty_like(tensor).uniform_(-scale, scale)


# -- early stopping ----------------------------------------------------------------------


class EarlyStoppingOptions(ComponentOptions):
    metric: str = Field("loss", description="an evaluation metric (a key of metrics.after)")
    mode: Literal["min", "max"] | None = Field(None, description="min or max; default: the direction the metric's evaluator declares")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")
    restore_best: bool = Field(True, description="when stopping, put the best weights back into the model so the "
                                                   "final and train-split evaluations see them")


class EarlyStopping:
    """Marks improving evaluations as best and stops after ``patience`` without improvement.

    The core keeps the weights of the last evaluation marked best and saves those. With
    ``restore_best`` the best trainable weights are also copied back into the model when it
    stops, so the final evaluation and ``training.eval_train_examples`` measure the saved
    weights. A run that reaches its last step without running out of patience keeps its last
    weights in the model: the saved adapter and ``metrics.after`` are still the best
    evaluation's, but ``metrics.train`` (``training.eval_train_examples``) is then measured on
    the last weights."""

    Options = EarlyStoppingOptions

    def __init__(self, options: EarlyStoppingOptions) -> None:
        self.options = options
        self.mode: str | None = options.mode  # else the evaluator's declared direction, read at the first evaluation
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0
        self.stopped = False
        self.model: Any = None
        self.snapshot: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @classmethod
    def check_metrics(cls, options: EarlyStoppingOptions, directions: MetricDirections) -> list[str]:
        """At validation: the metric needs a direction, the recipe's (``mode``) or its evaluator's."""
        if options.mode is not None or directions.direction(options.metric) is not None:
            return []
        return [f"options.metric: no evaluator of the recipe declares which way {options.metric!r} improves; "
                f"add the evaluator that reports it, or set options.mode to min or max"]

    def setup(self, model: torch.nn.Module, task: Any, tokenizer: Any) -> None:
        self.model = model

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.options.min_delta
        return value > self.best + self.options.min_delta

    def after_evaluate(self, metrics: dict[str, float], step: int) -> Decision | None:
        from plugtune.sdk import TrainingError

        if self.stopped:
            return None
        name = self.options.metric
        if name not in metrics:
            raise TrainingError(f"early_stopping: metric {name!r} is not among the evaluation's metrics "
                                f"({', '.join(sorted(metrics)) or 'none'}); add its evaluator or set metric")
        if self.mode is None:
            self.mode = metrics.direction(name) if isinstance(metrics, EvalMetrics) else None
            if self.mode is None:
                raise TrainingError(f"early_stopping: no evaluator declares which way {name!r} improves; "
                                    f"set options.mode to min or max")
        value = float(metrics[name])
        if math.isnan(value):
            improved = False
        else:
            improved = self._improved(value)
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
            if self.options.restore_best and self.model is not None:
                self.snapshot = [(p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad]
            return Decision(best=True)
        self.bad += 1
        if self.bad >= self.options.patience:
            self.stopped = True
            if self.snapshot:
                import torch

                with torch.no_grad():
                    for p, saved in self.snapshot:
                        p.copy_(saved)
                self.snapshot = []
            return Decision(stop=True)
        return None

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the best value so far, the patience used up, the kept weights."""
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "stopped": self.stopped,
                "snapshot": [saved for _, saved in self.snapshot]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad, self.stopped = int(state.get("bad", 0)), bool(state.get("stopped", False))
        saved = state.get("snapshot") or []
        params = [p for p in self.model.parameters() if p.requires_grad] if self.model is not None else []
        self.snapshot = list(zip(params, saved)) if len(params) == len(saved) else []

    def report(self, model: torch.nn.Module) -> dict[str, float]:
        if self.best is None:
            return {}
        return {"best": self.best, "best_step": float(self.best_step or 0), "bad_evals": float(self.bad)}


@hookimpl
def register_regularizers(register):
    register("dropout", Dropout)
    register("label_smoothing", LabelSmoothing)
    register("grad_clip", GradClip)
    register("l2sp", L2SP)
    register("neftune", NEFTune)
    register("early_stopping", EarlyStopping)
