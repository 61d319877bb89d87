"""``training.budget``: train for a time or a number of tokens instead of guessed steps.

A recipe that says ``budget: 10m`` (or ``90s``, ``1h30m``, ``2M tokens``) lets the run choose
its number of optimizer steps, and with it the learning-rate schedule's horizon:

* **tokens** (``2M tokens``, ``500k tokens``): known before the first step. A step consumes
  ``batch_size x grad_accum`` training rows, so the steps are the budget divided by the mean
  number of real (unpadded) tokens per row times the rows per step, rounded up.
* **time** (``10m``): measured. The first step (which pays for allocation and warm-up) is not
  timed; the next :data:`CALIBRATION_STEPS` give seconds per training token, and the plan is
  the remaining time divided by that rate times the mean tokens per step. Seconds per *token*
  rather than per step, because length-grouped batches differ in size several-fold: a per-step
  mean over three batches of one length group says little about the others. The seconds are the
  loop's wall clock since the first step ended, so logging, periodic evaluations and checkpoints,
  which the budget also pays for, are in the rate. The plan is revised at a tenth, a quarter,
  half and three quarters of it from every step timed so far; after that the horizon stays put
  so the schedule's tail is smooth. If the machine slows down so much that the
  budget is overrun by :data:`OVERRUN` the loop stops where it is and says so.

What the budget covers: the training loop's wall time (steps, evaluations during training,
checkpoints). Loading the model, encoding the data and the evaluations before and after training
are not part of it; the run prints them separately. ``max_steps``, or else ``epochs`` given
explicitly, caps the plan (never more steps, never more passes over the data, than it says):
``budget: 3m`` with ``epochs: 2`` reads "two epochs, or what fits in three minutes"; an override
``training.max_steps=20`` sets the steps of a budget recipe as it does any other's, epochs or
not (max_steps overrides epochs, with or without a budget, as in transformers' Trainer).

The schedule is transformers' own (``get_scheduler``), rebuilt with the new horizon and
fast-forwarded to the current step whenever the plan changes, so its shape is exactly the
library's for the chosen number of steps from that point on.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

CALIBRATION_STEPS = 3  # timed steps after the untimed first one before the first plan
REVISIONS = (0.1, 0.25, 0.5, 0.75)  # the plan is revised when these fractions of it are done
OVERRUN = 0.15  # stop when the loop has run this much past the budget
MIN_STEPS = 1

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_TIME = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$", re.I)
_TOKENS = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgb]?)\s*tok(?:en)?s?\s*$", re.I)
MAX_SECONDS = 366 * 86400
MAX_TOKENS = 10**15


@dataclass(frozen=True)
class Budget:
    """A parsed ``training.budget``: exactly one of ``seconds`` and ``tokens``."""

    seconds: float | None = None
    tokens: int | None = None

    def __str__(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens:,} tokens"
        return format_seconds(self.seconds or 0.0)


def format_seconds(seconds: float) -> str:
    """``610`` -> ``10m10s``: how the run prints times next to a budget."""
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def parse_budget(text: Any) -> Budget:
    """``"10m"``, ``"1h30m"``, ``"90s"``, ``600`` (seconds), ``"2M tokens"`` -> :class:`Budget`.

    Raises ``ValueError`` with the accepted forms; the recipe reports it as ``training.budget``."""
    if isinstance(text, bool):
        raise ValueError(_FORMS)
    if isinstance(text, (int, float)):
        seconds = float(text)
        return _seconds(seconds)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(_FORMS)
    tokens = _TOKENS.match(text)
    if tokens:
        count = float(tokens.group(1)) * _SCALE[tokens.group(2).lower()]
        if not math.isfinite(count) or count < 1 or count > MAX_TOKENS:
            raise ValueError(f"{text!r}: a token budget is between 1 and {MAX_TOKENS:.0e} tokens")
        return Budget(tokens=int(math.ceil(count)))
    time = _TIME.match(text)
    if time and any(time.groups()):
        seconds = sum(float(v) * u for v, u in zip(time.groups(), (86400, 3600, 60, 1)) if v)
        return _seconds(seconds)
    raise ValueError(f"{text!r}: {_FORMS}")


_FORMS = "give a time such as 10m, 90s or 1h30m, or a token count such as 2M tokens"


def _seconds(seconds: float) -> Budget:
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_SECONDS:
        raise ValueError(f"a time budget is more than 0 s and at most a year ({_FORMS})")
    return Budget(seconds=seconds)


@dataclass
class Plan:
    """The steps chosen so far and why: printed, logged as a ``plan`` record and kept in the
    manifest (``training.plan``)."""

    budget: str
    total_steps: int
    reason: str
    seconds_per_token: float | None = None
    tokens_per_step: float | None = None
    final: bool = False
    revised: list[float] = field(default_factory=list)  # the fractions of REVISIONS this plan has acted on

    def record(self) -> dict[str, Any]:
        return {"budget": self.budget, "total_steps": self.total_steps, "reason": self.reason,
                "seconds_per_token": self.seconds_per_token, "tokens_per_step": self.tokens_per_step}


class BudgetPlanner:
    """Chooses and revises the number of optimizer steps for a budget (see the module docstring).

    ``tokens_per_step``: the mean real tokens a step consumes (rows per step times the mean row
    length of the training split). ``cap``: the most steps allowed (explicit ``epochs``), or
    None. ``spent_seconds``: training seconds already spent (a resumed run)."""

    def __init__(self, budget: Budget, tokens_per_step: float, *, cap: int | None = None,
                 cap_source: str = "training.epochs", spent_seconds: float = 0.0, start_step: int = 0) -> None:
        self.budget, self.tokens_per_step, self.cap = budget, max(tokens_per_step, 1e-9), cap
        self.cap_source = cap_source
        self.spent, self.start_step = spent_seconds, start_step
        self.timed_tokens, self.timed_seconds, self.timed_steps, self._clock_start = 0, 0.0, 0, 0.0
        self.plan: Plan | None = None
        self._revised: set[float] = set()  # the fractions of REVISIONS already acted on

    def initial_steps(self) -> Plan:
        """The horizon to build the schedule with before anything is measured: exact for a
        token budget; for a time budget a provisional one (the cap, or a long horizon) that the
        first plan replaces after the calibration steps."""
        if self.budget.tokens is not None:
            steps = max(MIN_STEPS, math.ceil(self.budget.tokens / self.tokens_per_step))
            self.plan = Plan(str(self.budget), self._capped(steps), self._why(steps, f"{self.tokens_per_step:,.0f} tokens per step"),
                             tokens_per_step=self.tokens_per_step, final=True)
            return self.plan
        provisional = self.cap or 10**6
        self.plan = Plan(str(self.budget), provisional, "provisional, until the first steps are timed")
        return self.plan

    def record(self, step: int, elapsed: float, tokens: int) -> None:
        """One finished optimizer step: the loop's wall seconds so far (this process) and the
        real tokens of the step's rows. Time is measured from the end of this process's first
        step (which pays for allocation and warm-up) on the loop's clock, so what happens
        between steps (logging, evaluations, checkpoints, collation) is paid for too."""
        if step - self.start_step == 1:
            self._clock_start = elapsed
            return
        if step - self.start_step > 1:
            self.timed_seconds = elapsed - self._clock_start
            self.timed_tokens += tokens
            self.timed_steps += 1

    def due(self, step: int) -> bool:
        """Whether ``step`` is where the plan is made or revised. A function of the step and
        the current plan only, which every process of a data-parallel run shares, so all of
        them reach the same decision points (where the main process's plan is broadcast)."""
        if self.budget.seconds is None or self.plan is None or self.plan.final:
            return False
        if step - self.start_step < CALIBRATION_STEPS + 1:
            return False
        if self.plan.reason.startswith("provisional"):
            return True
        return any(f not in self._revised and step >= f * self.plan.total_steps for f in REVISIONS)

    def replan(self, step: int, elapsed: float) -> Plan:
        """The plan at ``step`` from every step timed so far (``elapsed``: this process's loop
        seconds): the remaining time over seconds per token times tokens per step."""
        assert self.budget.seconds is not None and self.plan is not None
        revised = self._revised | {f for f in REVISIONS if step >= f * self.plan.total_steps} \
            if not self.plan.reason.startswith("provisional") else set(self._revised)
        rate = self.timed_seconds / max(self.timed_tokens, 1)
        remaining = self.budget.seconds - self.spent - elapsed
        more = max(0, math.floor(remaining / (rate * self.tokens_per_step))) if rate > 0 else 0
        steps = max(step + more, MIN_STEPS)
        return Plan(str(self.budget), self._capped(steps),
                    self._why(steps, f"{1e3 * rate:.3f} ms per token over {self.timed_steps} timed steps, "
                                     f"{self.tokens_per_step:,.0f} tokens per step"),
                    seconds_per_token=rate, tokens_per_step=self.tokens_per_step, final=revised >= set(REVISIONS),
                    revised=sorted(revised))

    def adopt(self, plan: Plan) -> bool:
        """Take ``plan`` (this process's or the main process's); True when the horizon changed."""
        changed = self.plan is None or plan.total_steps != self.plan.total_steps
        self._revised = set(plan.revised)
        self.plan = plan
        return changed

    def fixed(self, total_steps: int, reason: str) -> Plan:
        """A plan that no longer changes: a resumed run keeps the horizon its checkpoint
        recorded, so its schedule continues exactly where it stopped."""
        self.plan = Plan(str(self.budget), total_steps, reason, final=True)
        return self.plan

    def overrun(self, elapsed: float) -> bool:
        """True when a time budget is overrun by more than :data:`OVERRUN`: stop now."""
        return self.budget.seconds is not None and self.spent + elapsed > self.budget.seconds * (1 + OVERRUN)

    def _capped(self, steps: int) -> int:
        return min(steps, self.cap) if self.cap else steps

    def _why(self, steps: int, reason: str) -> str:
        """The plan's reason, saying so when the cap, not the budget, set the steps (the budget
        would allow ``steps``): a recipe whose epochs end first finishes early, by design."""
        if self.cap and steps > self.cap:
            return f"{reason}; the budget allows {steps:,}, {self.cap_source} caps it"
        return reason


def rebuild_schedule(prepared: Any, name: str, warmup_steps: int, total_steps: int, step: int) -> None:
    """Give ``prepared`` (a scheduler, possibly accelerate's wrapper around one) transformers'
    schedule ``name`` over ``total_steps``, fast-forwarded to ``step``: the learning rate from
    here on is what that schedule would give had it been built with this horizon."""
    from transformers import get_scheduler

    inner = getattr(prepared, "scheduler", prepared)
    optimizer = inner.optimizer  # its groups keep "initial_lr", which the new schedule starts from
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": the fast-forward
        fresh = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
        for _ in range(step):
            fresh.step()
    if prepared is inner:
        prepared.__dict__.update(fresh.__dict__)
    else:
        prepared.scheduler = fresh
