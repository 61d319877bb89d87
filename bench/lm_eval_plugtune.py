"""An lm-evaluation-harness model backed by plugtune's ``AdapterHost``, registered as ``plugtune``.

    bench/.venv-lmeval/bin/python bench/lm_eval_plugtune.py run --model plugtune \\
        --model_args adapter=adapters/quickstart,base=smollm2-135m \\
        --include_path bench/lm_eval --tasks support_department

(``bash bench/setup_lm_eval.sh`` makes that venv.) Run as a script it is lm-eval's own command
line with this model registered; ``import lm_eval_plugtune`` registers it for
``lm_eval.simple_evaluate(model="plugtune", ...)`` too.

Model arguments: ``base`` (a plugtune alias or folder; default: the adapter's base, else
smollm2-135m), ``adapter`` (an adapter folder; none: the bare base), ``dtype`` (float32,
bfloat16; default fp32 on CPU), ``max_length`` (default: the model's context),
``batch_size`` (rows per forward for loglikelihood; default 1).

Tokens are what lm-eval's ``local-completions`` backend sends a server (its Hugging Face
tokenizer without special tokens, context and continuation split by ``TemplateLM._encode_pair``),
so scores through ``plugtune serve`` and through this model are computed on the same ids.
Prompts are used raw: the adapter's own prompt template is not applied, as a completions
server does not apply it either.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401 - the built-in models first: lm-eval loads them only while its registry is empty
import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm


@register_model("plugtune")
class PlugtuneLM(TemplateLM):
    """lm-eval's ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` on an
    :class:`~plugtune.serving.host.AdapterHost` holding one base and at most one adapter."""

    def __init__(self, adapter: str | None = None, base: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, batch_size: int | str | None = 1, max_gen_toks: int = 256,
                 **_: Any) -> None:
        super().__init__()
        from plugtune.data.tasks import build_task
        from plugtune.serving.host import AdapterHost

        torch_dtype = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, "bad")
        if torch_dtype == "bad":
            raise ValueError(f"plugtune model_args: dtype must be float32 or bfloat16 (got {dtype!r})")
        if adapter:
            self.host = AdapterHost.from_adapters(adapter, base_model=base, dtype=torch_dtype)
            self.adapter = self.host.active
        else:
            task = build_task(dict(type="causal-lm", prompt="{text}", response=" {label}"))
            self.host = AdapterHost.from_base(base or "smollm2-135m", task, dtype=torch_dtype)
            self.adapter = None
        self.tokenizer = self.host.tokenizer
        self.batch_size = int(batch_size) if str(batch_size or "1").isdigit() else 1
        context = getattr(self.host.base.model.config, "max_position_embeddings", None)
        self._max_length = int(max_length) if max_length else int(context or 2048)
        self.max_gen_toks = int(max_gen_toks)

    # -- what TemplateLM needs --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # As local-completions' Hugging Face backend: no special tokens unless asked.
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens), return_attention_mask=False).input_ids

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities ``(T, V)`` of each row of ids, right-padded into one forward."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        device = next(self.host.base.model.parameters()).device
        with self.host.using(self.adapter):
            logits = self.host.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        return [logprobs[i, : len(r)] for i, r in enumerate(rows)]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="plugtune loglikelihood"):
            chunk = order[start: start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                cache_key, context, continuation = requests[i]
                whole = (context + continuation)[-self.max_length:]  # left-truncated, as local-completions does
                rows.append(whole)
                spans.append((len(whole) - len(continuation), continuation))
            for i, row, (begin, continuation), logprobs in zip(chunk, rows, spans, self._forward(rows)):
                # Token t is predicted at position t - 1.
                picked = logprobs[begin - 1: len(row) - 1]  # (C, V)
                target = torch.tensor(continuation)
                total = float(picked.gather(1, target[:, None]).sum())
                greedy = bool((picked.argmax(-1) == target).all())
                results[i] = (total, greedy)
                cache_key = requests[i][0]
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, (total, greedy))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="plugtune rolling"):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="plugtune generate"):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode([self.eot_token_id])
            stop = [s for s in dict.fromkeys([*until, eos]) if s][:4]
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_tokens", self.max_gen_toks)))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            stream = self.host.stream([ids], self.adapter, max_new_tokens=max_new, temperature=temperature,
                                      stop=stop, seed=1234)
            for _ in stream:
                pass
            text = stream.texts[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
