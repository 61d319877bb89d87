"""Structured output: a grammar decides, at every decode step, which tokens a row may take.

When: a request asks for a shape (OpenAI's ``response_format`` with a JSON schema or "any
JSON object"; vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` extras or its newer ``structured_outputs``), or a classification-style
causal adapter should answer with one of its label words. Why: sampling alone gives text
that *usually* parses; a mask on the logits gives text that always does, at the cost of one
bitmask per step.

The engine (the server's decode loop) uses it in four calls:

* :func:`constraint_from_request` reads the request fields into a :class:`ConstraintSpec`
  (or None), raising a one-line :class:`ValueError` that names the field for anything
  malformed (the server's 400);
* :func:`build_constraint` compiles it once through the host's :class:`ConstraintCompiler`
  (cached; an uncompilable schema or regex is also a one-line :class:`ValueError` naming
  the field) into a factory; calling the factory gives one :class:`TokenConstraint` per
  row (each row of ``n > 1`` gets its own, as each holds its own parse state);
* per decode step, :func:`apply_constraints` masks the logits of all constrained rows of
  one forward in place (one batched bitmask fill, one ``apply_token_bitmask_inplace`` with
  the rows' indices; unconstrained rows are untouched);
* after picking, :meth:`TokenConstraint.accept` advances each constrained row, and
  :attr:`TokenConstraint.finished` says when the grammar is complete and allows nothing but
  a stop token, so the engine can end the row with reason ``"stop"`` without spending a
  step on the end-of-sequence token.

The library is **xgrammar** (0.2.8): it is vLLM's and SGLang's default structured-output
backend; it compiles JSON Schema, regular expressions and EBNF grammars once per tokenizer
(token masks precomputed for the context-independent tokens, a pushdown automaton for the
rest), and fills a whole batch's masks in native code (threads, without the GIL) and applies
them with one bitmask kernel on CPU or GPU. The alternatives were weighed: outlines-core
builds a full vocabulary index per schema (seconds per new schema, and regular languages
only), lm-format-enforcer walks the vocabulary in pure Python per token.

Choices made here, each because it matters for serving:

* **Stop tokens**: the compiler is given the tokens that end a row (the tokenizer's EOS and
  the model's ``eos_token_id``\\s, e.g. SmolLM2's ``<|im_end|>``); once the grammar is
  complete the mask allows only those, so a constrained row ends at EOS.
* **Special tokens** other than the stop tokens (``<|im_start|>``, ``<|endoftext|>``, ...)
  are never allowed: xgrammar would otherwise take them as their literal text, and the
  server decodes with ``skip_special_tokens=True``, so the visible answer would no longer
  be what the grammar matched.
* **Vocabulary padding**: the mask is as wide as the model's output (``vocab_size``, which
  may exceed the tokenizer's vocabulary when the embedding matrix is padded); ids the
  tokenizer lacks are masked, and logits wider still are masked beyond the mask's width.
* **Whitespace**: JSON is generated on one line with ``json.dumps``' separators (``", "``
  and ``": "``; xgrammar's ``any_whitespace=False``), so a model cannot run away in
  whitespace between tokens, and the output looks like the JSON models have read most.
* **Strict objects**: for a JSON schema, properties the schema does not declare are not
  generated (xgrammar's ``strict_mode``, OpenAI's ``strict: true``); ``json_object`` allows
  any properties.
* **Two xgrammar 0.2.8 holes repaired** (found by random walks through grammars, see
  ``tests/test_constraints.py``): a JSON string with ``minLength``/``maxLength`` admitted raw
  control characters (a TAB inside a string: invalid JSON) and no escapes
  (mlc-ai/xgrammar#800, fixes still open upstream); and every negated character class (JSON
  strings, ``[^a]``, a regex's ``.``) admitted U+D800-U+DFFF as 3-byte sequences that are
  not UTF-8, which byte-level tokenizers can spell and which decode to three U+FFFD. Both
  are fixed by rewriting xgrammar's own EBNF before compiling it (:func:`_json_schema_grammar`,
  :func:`_without_surrogates`); a release that no longer prints the faulty rules is left as
  it is.
* **Cache**: compiled grammars are kept per (kind, canonical value) in a bounded
  least-recently-used cache (64 by default; a grammar for SmolLM2's 49k vocabulary is about
  1 MB); xgrammar's own unbounded cache is off so that this is the one bound.
* **Threads**: the server compiles on request threads (the compile releases the GIL) while
  its worker thread matches; the cache is locked, each :class:`TokenConstraint` belongs to
  one row and is touched by the worker only.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

try:
    import xgrammar as xgr
except ImportError as error:  # pragma: no cover - the serve extra brings it
    raise ImportError("structured output needs xgrammar: pip install 'plugtune[serve]' (or xgrammar>=0.2.8)") from error

__all__ = [
    "ConstraintCompiler",
    "ConstraintFactory",
    "ConstraintSpec",
    "TokenConstraint",
    "apply_constraints",
    "build_constraint",
    "constraint_from_request",
]

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
JSON_SEPARATORS = (", ", ": ")
"""The separators of generated JSON (those of :func:`json.dumps`): one line, no free whitespace."""
DEFAULT_CACHE_SIZE = 64


# --------------------------------------------------------------------------------------------
# Per row: the parse state
# --------------------------------------------------------------------------------------------

class TokenConstraint:
    """One row's grammar state: created by a factory from :meth:`ConstraintCompiler.json_schema`
    (and friends), advanced by :meth:`accept` with every token the row takes, read by
    :func:`apply_constraints`. Not shared between rows or threads."""

    __slots__ = ("_matcher", "_compiler", "_finished")

    def __init__(self, compiled: xgr.CompiledGrammar, compiler: ConstraintCompiler) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._compiler = compiler
        self._finished: bool | None = None  # cached per state; None: not computed yet

    @property
    def vocab_size(self) -> int:
        """The width of the mask: the model's vocabulary as the compiler was given it."""
        return self._compiler.vocab_size

    def accept(self, token: int) -> None:
        """Advance by the token the row just took. ``token`` must be one the last mask allowed
        (a stop token included, after which the constraint is :attr:`finished`); any other
        raises :class:`ValueError`, the row's state unchanged."""
        if not self._matcher.accept_token(int(token)):
            raise ValueError(f"token {int(token)} is not allowed by the row's grammar here "
                             f"(pick the row's token after apply_constraints masked its logits)")
        self._finished = None

    @property
    def finished(self) -> bool:
        """True when the grammar is complete and allows nothing more than a stop token (or a
        stop token was accepted): the engine ends the row with reason ``"stop"``."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():  # a complete match is needed to stop at all
            return False
        if self._finished is None:
            mask = xgr.allocate_token_bitmask(1, self.vocab_size)
            self._matcher.fill_next_token_bitmask(mask)
            self._finished = not bool((mask & ~self._compiler._stop_bits).any())
        return self._finished

    @property
    def terminated(self) -> bool:
        """True once a stop token was accepted: nothing at all may follow."""
        return self._matcher.is_terminated()


class ConstraintFactory:
    """A compiled grammar: call it for a fresh :class:`TokenConstraint` (one per row)."""

    __slots__ = ("kind", "_compiled", "_compiler")

    def __init__(self, kind: str, compiled: xgr.CompiledGrammar, compiler: ConstraintCompiler) -> None:
        self.kind = kind
        self._compiled = compiled
        self._compiler = compiler

    def __call__(self) -> TokenConstraint:
        return TokenConstraint(self._compiled, self._compiler)

    def __repr__(self) -> str:
        return f"ConstraintFactory({self.kind})"


# --------------------------------------------------------------------------------------------
# Per step: the batched mask
# --------------------------------------------------------------------------------------------

_batch_lock = threading.Lock()
_batch_matcher: xgr.BatchGrammarMatcher | None = None


def _batch() -> xgr.BatchGrammarMatcher:
    global _batch_matcher
    if _batch_matcher is None:
        _batch_matcher = xgr.BatchGrammarMatcher()  # "auto": half the hardware threads
    return _batch_matcher


def apply_constraints(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> None:
    """In place: for each row ``i`` of ``logits`` (rows, V) with ``constraints[i]`` not None,
    every token its grammar does not allow now becomes ``-inf``; rows whose constraint is None
    are left as they are. One bitmask is filled for the constrained rows (in native threads)
    and applied with one ``xgrammar.apply_token_bitmask_inplace`` call with their indices.

    ``V`` is the model's vocabulary; columns past the compiler's ``vocab_size`` (a wider
    output than the compiler was told of) are masked too. ``logits`` may be float32, bfloat16
    or float16, on CPU or on the GPU (the bitmask is copied there), and may be a row-strided
    view (``logits[:, -1]`` of a forward's output)."""
    if len(constraints) != logits.shape[0]:
        raise ValueError(f"apply_constraints: {logits.shape[0]} rows of logits but {len(constraints)} constraints")
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    active: list[TokenConstraint] = [constraints[i] for i in rows]  # type: ignore[misc]
    vocab = active[0].vocab_size
    if any(c.vocab_size != vocab for c in active):
        raise ValueError("apply_constraints: the rows' constraints come from compilers of different vocabulary sizes")
    if logits.shape[-1] < vocab:
        raise ValueError(f"apply_constraints: logits have {logits.shape[-1]} columns but the constraints' vocabulary "
                         f"has {vocab} tokens (build the ConstraintCompiler with the model's vocab_size)")
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], vocab)  # (rows, ceil(V/32)) int32, all allowed
    live = [(i, c) for i, c in zip(rows, active) if not c.terminated]
    for i, c in zip(rows, active):
        if c.terminated:  # a stop token was taken: only stop tokens (the engine should have ended the row)
            bitmask[i] = c._compiler._stop_bits[0]
    if len(live) == 1:
        live[0][1]._matcher.fill_next_token_bitmask(bitmask, live[0][0])
    elif live:
        with _batch_lock:
            _batch().batch_fill_next_token_bitmask([c._matcher for _, c in live], bitmask, [i for i, _ in live])
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)
    if logits.shape[-1] > vocab:
        logits[rows, vocab:] = float("-inf")


# --------------------------------------------------------------------------------------------
# Per host: the compiler and its cache
# --------------------------------------------------------------------------------------------

_XGR_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*[^\s:]+:\d+:\s*")


def _one_line(error: BaseException) -> str:
    """xgrammar's message without its ``[time] file.cc:line:`` prefix, on one line."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    return _XGR_PREFIX.sub("", text) or type(error).__name__


class ConstraintCompiler:
    """Compiles grammars for one tokenizer and model vocabulary, with a bounded LRU cache keyed
    by (kind, canonical value); safe to call from several threads at once.

    ``vocab_size`` is the model's output width (``config.vocab_size``, the number of logits);
    ``stop_token_ids`` the tokens that end a row (default: the tokenizer's EOS). Each method
    returns a :class:`ConstraintFactory`; a value that cannot be compiled raises a one-line
    :class:`ValueError` (what is wrong; :func:`build_constraint` adds the request field)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int] | None = None, *,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        stops = sorted({int(t) for t in stop_token_ids}) if stop_token_ids else []
        if not stops and getattr(tokenizer, "eos_token_id", None) is not None:
            stops = [int(tokenizer.eos_token_id)]
        if not stops:
            raise ValueError("ConstraintCompiler: the tokenizer has no EOS token; pass stop_token_ids")
        if any(not 0 <= t < vocab_size for t in stops):
            raise ValueError(f"ConstraintCompiler: stop_token_ids {stops} outside the vocabulary of {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.stop_token_ids: tuple[int, ...] = tuple(stops)
        self.cache_size = int(cache_size)
        try:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=stops)
        except (ValueError, RuntimeError, AttributeError) as error:
            raise ValueError(f"ConstraintCompiler: xgrammar cannot read the tokenizer {type(tokenizer).__name__} "
                             f"({_one_line(error)}); structured output needs a Hugging Face fast tokenizer") from None
        hidden = self._special_ids(tokenizer) - set(stops)
        if hidden:  # an empty token string is how xgrammar marks a token it never allows
            vocab = [""] * self.vocab_size
            for token, i in tokenizer.get_vocab().items():
                if i < self.vocab_size and i not in hidden:
                    vocab[i] = token
            info = xgr.TokenizerInfo.from_vocab_and_metadata(vocab, info.dump_metadata())
        self.tokenizer_info = info
        self._xgr = xgr.GrammarCompiler(info, cache_enabled=False)  # the cache below is the one bound
        self._cache: OrderedDict[tuple[str, Any], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        stop_bits = torch.zeros(xgr.get_bitmask_shape(1, self.vocab_size), dtype=torch.int64)
        for t in stops:
            stop_bits[0, t // 32] |= 1 << (t % 32)
        self._stop_bits = torch.where(stop_bits >= 2**31, stop_bits - 2**32, stop_bits).to(xgr.bitmask_dtype)

    @staticmethod
    def _special_ids(tokenizer: Any) -> set[int]:
        ids = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or ()}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
        return ids

    # -- the kinds ------------------------------------------------------------------------

    def json_schema(self, schema: Mapping[str, Any] | str) -> ConstraintFactory:
        """JSON valid for ``schema`` (a dict or its JSON text), on one line, without
        properties the schema does not declare."""
        text = _canonical_schema(schema, "JSON schema")
        return self._get("json_schema", text, lambda: self._xgr.compile_grammar(_json_schema_grammar(text)), "JSON schema")

    def json_object(self) -> ConstraintFactory:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``), on one line."""
        return self._get("json_object", None, lambda: self._xgr.compile_grammar(_repaired(xgr.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=False))), "JSON object")

    def regex(self, pattern: str) -> ConstraintFactory:
        """Text that the regular expression matches as a whole (xgrammar's dialect: that of
        JavaScript, without lookaround or backreferences)."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("regex: give a non-empty string")
        return self._get("regex", pattern, lambda: self._xgr.compile_grammar(_repaired(xgr.Grammar.from_regex(pattern))), "regex")

    def choice(self, options: Sequence[str]) -> ConstraintFactory:
        """Exactly one of ``options`` (non-empty strings), as written."""
        key = _choice_options(options, "choice")
        ebnf = "root ::= " + " | ".join(json.dumps(o, ensure_ascii=True) for o in dict.fromkeys(key))
        return self._get("choice", key, lambda: self._xgr.compile_grammar(ebnf), "choice")

    def grammar(self, ebnf: str) -> ConstraintFactory:
        """Text of an EBNF grammar in xgrammar's (GBNF-like) syntax, rule ``root`` first."""
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise ValueError("grammar: give an EBNF grammar as a non-empty string")
        return self._get("grammar", ebnf, lambda: self._xgr.compile_grammar(_repaired(xgr.Grammar.from_ebnf(ebnf))), "EBNF grammar")

    # -- the cache ------------------------------------------------------------------------

    def _get(self, kind: str, value: Any, compile: Callable[[], xgr.CompiledGrammar], what: str) -> ConstraintFactory:
        key = (kind, value)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return ConstraintFactory(kind, compiled, self)
        try:  # outside the lock: another request's compile need not wait for this one
            compiled = compile()
        except (RuntimeError, ValueError, TypeError, RecursionError, xgr.InvalidJSONError) as error:
            raise ValueError(f"invalid {what}: {_one_line(error)}") from None
        with self._lock:
            self.misses += 1
            compiled = self._cache.setdefault(key, compiled)  # a concurrent compile of the same key: keep one
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return ConstraintFactory(kind, compiled, self)

    def cached(self) -> int:
        """How many compiled grammars the cache holds now."""
        with self._lock:
            return len(self._cache)


_BARE_CHARACTER = r' ::= (([^\"\\\r\n]))'
_JSON_CHARACTER = r' ::= (([^\0-\x1f\"\\]) | ("\\" plugtune_json_escape))'
_JSON_ESCAPE_RULE = r'plugtune_json_escape ::= (([\"\\/bfnrt]) | ("u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]))'


_SURROGATES = r"\uD800-\uDFFF"
_ANY_CHARACTER = r"[\0-\U0010ffff]"


def _without_surrogates(ebnf: str) -> str:
    """``ebnf`` with U+D800-U+DFFF taken out of every negated character class and out of
    "any character" (a regex's ``.``): xgrammar 0.2.8 matches them there as their 3-byte
    encodings, which are not UTF-8, so a byte-level tokenizer's byte tokens could spell one
    and the decoded text would hold three U+FFFD instead (breaking ``maxLength`` and the
    pattern). String literals are left alone."""
    out: list[str] = []
    i, n = 0, len(ebnf)
    while i < n:
        ch = ebnf[i]
        if ch == '"':  # a string literal: copy to its closing quote
            j = i + 1
            while j < n and ebnf[j] != '"':
                j += 2 if ebnf[j] == "\\" else 1
            out.append(ebnf[i:j + 1])
            i = j + 1
        elif ch == "[":
            j = i + 1
            while j < n and ebnf[j] != "]":
                j += 2 if ebnf[j] == "\\" else 1
            cls = ebnf[i:j + 1]
            if cls == _ANY_CHARACTER:
                cls = f"[^{_SURROGATES}]"
            elif cls.startswith("[^") and _SURROGATES not in cls:
                cls = cls[:-1] + _SURROGATES + "]"
            out.append(cls)
            i = j + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _repaired(grammar: xgr.Grammar) -> xgr.Grammar:
    """``grammar`` without surrogates (:func:`_without_surrogates`), re-parsed."""
    ebnf = str(grammar)
    fixed = _without_surrogates(ebnf)
    return grammar if fixed == ebnf else xgr.Grammar.from_ebnf(fixed)


def _json_schema_grammar(text: str) -> xgr.Grammar:
    """xgrammar's grammar for the schema ``text``, one line, strict, with its length-bounded
    strings repaired: xgrammar 0.2.8 lowers a string with ``minLength``/``maxLength`` to a
    repetition of ``[^"\\\r\n]``, which admits raw control characters (invalid JSON: a TAB
    or U+0002 inside a string; ``json.loads`` refuses it) and no escapes (mlc-ai/xgrammar#800,
    fixes open in #822/#880). Each such character rule becomes one JSON character: an
    unescaped character outside U+0000-U+001F, ``"`` and ``\\``, or one escape. A version
    that no longer prints the bare rule is left as it is."""
    grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=True)
    ebnf = str(grammar)
    lines = ebnf.splitlines()
    repaired = [line[: -len(_BARE_CHARACTER)] + _JSON_CHARACTER if line.endswith(_BARE_CHARACTER) else line for line in lines]
    if repaired != lines:
        grammar = xgr.Grammar.from_ebnf("\n".join([*repaired, _JSON_ESCAPE_RULE]))
    return _repaired(grammar)


def _canonical_schema(schema: Any, field: str) -> str:
    """The schema as compact JSON text (keys kept in their order: xgrammar generates
    properties in the schema's order, so it is part of the grammar)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"{field}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(schema, Mapping):
        raise ValueError(f"{field}: a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field}: not serialisable as JSON ({error})") from None


def _choice_options(options: Any, field: str) -> tuple[str, ...]:
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence) or not options:
        raise ValueError(f"{field}: give a non-empty list of strings")
    for k, option in enumerate(options):
        if not isinstance(option, str) or not option:
            raise ValueError(f"{field}[{k}]: each choice must be a non-empty string, got {option!r}")
    return tuple(options)


# --------------------------------------------------------------------------------------------
# Per request: the fields that ask for it
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asked for: ``kind`` one of ``json_schema`` (``value``: the schema as
    compact JSON text), ``json_object`` (``value`` None), ``regex`` (the pattern), ``choice``
    (a tuple of strings), ``grammar`` (EBNF text); ``field`` is the request field it came
    from, for error messages."""

    kind: Kind
    value: Any
    field: str


_STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                    "json_object": "json_object"}
_GUIDED_KEYS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}


def _spec(kind: str, value: Any, field: str) -> ConstraintSpec:
    if kind == "json_schema":
        return ConstraintSpec("json_schema", _canonical_schema(value, field), field)
    if kind == "json_object":
        return ConstraintSpec("json_object", None, field)
    if kind == "choice":
        return ConstraintSpec("choice", _choice_options(value, field), field)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}: give a non-empty string")
    return ConstraintSpec(kind, value, field)  # type: ignore[arg-type]


def _response_format(value: Any) -> ConstraintSpec | None:
    if not isinstance(value, Mapping):
        raise ValueError('response_format: give an object such as {"type": "json_object"}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object", None, "response_format")
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, Mapping):
            raise ValueError('response_format.json_schema: give an object {"name": ..., "schema": {...}}')
        schema = inner.get("schema")
        if schema is None:
            raise ValueError("response_format.json_schema.schema: required (the JSON schema the answer must follow)")
        strict = inner.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"response_format.json_schema.strict: give true or false, got {strict!r}")
        name = inner.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"response_format.json_schema.name: give a string, got {name!r}")
        return _spec("json_schema", schema, "response_format.json_schema.schema")
    raise ValueError(f"response_format.type: {kind!r} is not supported (use 'text', 'json_object' or 'json_schema')")


def constraint_from_request(body: Mapping[str, Any]) -> ConstraintSpec | None:
    """The structured-output request of an OpenAI/vLLM completions or chat body, or None.

    Read: ``response_format`` (``{"type": "text" | "json_object"}`` or ``{"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}}``); vLLM's ``guided_json``
    (object or JSON text), ``guided_regex``, ``guided_choice`` (list of strings),
    ``guided_grammar`` (EBNF); vLLM's ``structured_outputs`` object (``json``, ``regex``,
    ``choice``, ``grammar``, ``json_object: true``). Fields that are null count as absent.
    vLLM's backend hints (``guided_decoding_backend``, ``guided_whitespace_pattern``) are
    ignored. More than one, or a malformed one, raises a one-line :class:`ValueError` naming the field."""
    found: list[ConstraintSpec] = []
    if body.get("response_format") is not None:
        spec = _response_format(body["response_format"])
        if spec is not None:
            found.append(spec)
    for key, kind in _GUIDED_KEYS.items():
        if body.get(key) is not None:
            found.append(_spec(kind, body[key], key))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, Mapping):
            raise ValueError('structured_outputs: give an object such as {"json": {...}} or {"choice": [...]}')
        for key, value in outputs.items():
            if value is None or value is False:
                continue
            field = f"structured_outputs.{key}"
            if key not in _STRUCTURED_KEYS:
                raise ValueError(f"{field}: not supported (use one of {', '.join(_STRUCTURED_KEYS)})")
            if key == "json_object" and value is not True:
                raise ValueError(f"{field}: give true or false, got {value!r}")
            found.append(_spec(_STRUCTURED_KEYS[key], value, field))
    if len(found) > 1:
        raise ValueError(f"{' and '.join(s.field for s in found)}: give one structured-output constraint, not {len(found)}")
    return found[0] if found else None


def build_constraint(spec: ConstraintSpec, compiler: ConstraintCompiler) -> ConstraintFactory:
    """Compile ``spec`` (cached by the compiler) into a factory of per-row constraints; a
    value xgrammar refuses raises a one-line :class:`ValueError` naming ``spec.field``."""
    try:
        if spec.kind == "json_schema":
            return compiler.json_schema(spec.value)
        if spec.kind == "json_object":
            return compiler.json_object()
        if spec.kind == "regex":
            return compiler.regex(spec.value)
        if spec.kind == "choice":
            return compiler.choice(spec.value)
        if spec.kind == "grammar":
            return compiler.grammar(spec.value)
    except ValueError as error:
        raise ValueError(f"{spec.field}: {error}") from None
    raise ValueError(f"{spec.field}: unknown constraint kind {spec.kind!r} (one of {', '.join(KINDS)})")
