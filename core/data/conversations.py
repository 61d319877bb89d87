"""Conversations: chat rows in one shape, rendered with a chat template, masked by offsets.

What a chat task (or any task that trains on conversations, such as preference tuning) needs
and should not write twice:

* :func:`to_messages`: an OpenAI ``messages`` row, a ShareGPT ``conversations`` row or an
  Alpaca ``instruction``/``input``/``output`` row -> one list of ``{"role", "content"}``
  messages (roles ``system``, ``user``, ``assistant``, ``tool``); :func:`detect_format` says
  which shape a row has, and a row that fits none is a :class:`DataError` naming the shapes.
* :data:`BUILTIN_TEMPLATES` (``chatml``, ``llama-3``) and :class:`ChatTemplate`: a Jinja chat
  template's exact text and hash, rendered through the tokenizer's own sandboxed renderer
  (``apply_chat_template``) so that the tokenizer's special tokens are in scope as they are
  for its own template.
* :meth:`ChatTemplate.spans`: where each message sits in the rendered text, found by
  rendering, never by searching for the message's text: the message is rendered with two
  different one-character probes in place of its content, and the first character where the
  two renderings differ is where the content starts; what follows the probe is the turn's
  closing text (the end-of-turn token and what the template writes after it). Templates that
  insert text between turns (a default system prompt, a separator) are handled because only
  the template's own renderings are compared. A template that rewrites earlier turns when a
  later one is added (not "prefix-stable") is refused: no mask would be right for it.
* :func:`token_mask`: which tokens of the whole rendered text lie in the trained character
  spans, from the fast tokenizer's offsets.

Why probes rather than ``{% generation %}`` markers (transformers' ``return_assistant_tokens_mask``,
which TRL's assistant-only loss uses): most shipped templates, the base tokenizer's included,
have no markers, and the probes work on any template and any role. tests/test_chat.py checks
the two agree token for token on a template that has the markers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from plugtune.kernel.errors import DataError

Message = dict[str, str]
Format = Literal["openai", "sharegpt", "alpaca"]
FORMATS: tuple[Format, ...] = ("openai", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "openai": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}

# ShareGPT's speaker names -> roles (the names seen in public ShareGPT-style datasets)
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool",
    "function": "tool", "function_response": "tool", "observation": "tool", "function_call": "assistant",
}

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA_3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
           " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA_3}
"""Named templates a recipe may choose with ``template: NAME`` (the Jinja text is recorded
in the adapter's manifest either way)."""

PROBES = ("\x01", "\x02")  # two one-character contents no template rewrites


# --------------------------------------------------------------------------------------------
# One shape for every format
# --------------------------------------------------------------------------------------------


def detect_format(row: Mapping[str, Any], messages_key: str = "messages") -> Format | None:
    """The shape ``row`` has: ``openai`` (a ``messages_key`` list), ``sharegpt``
    (``conversations``) or ``alpaca`` (``instruction`` and ``output``); None for none."""
    if messages_key in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def format_keys(fmt: Format, messages_key: str = "messages") -> tuple[str, ...]:
    """The keys a row of format ``fmt`` must have (OpenAI's messages under ``messages_key``)."""
    return (messages_key,) if fmt == "openai" else FORMAT_KEYS[fmt]


def describe_formats(messages_key: str = "messages") -> str:
    return f"openai ('{messages_key}'), sharegpt ('conversations') or alpaca ('instruction' and 'output')"


def to_messages(row: Mapping[str, Any], fmt: Format, messages_key: str = "messages") -> list[Message]:
    """``row`` in format ``fmt`` as ``[{"role", "content"}]``; a :class:`DataError` (without
    the row number: the caller adds it) when it does not fit."""
    if fmt == "alpaca":
        return _alpaca(row)
    key = messages_key if fmt == "openai" else "conversations"
    turns = row.get(key)
    if isinstance(turns, str):  # a CSV cell holding the JSON list
        try:
            turns = json.loads(turns)
        except ValueError:
            raise DataError(f"{key!r} is text that is not a JSON list of messages") from None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{key!r} must be a non-empty list of messages, got {type(turns).__name__}")
    return [_openai_message(t, i, key) if fmt == "openai" else _sharegpt_message(t, i, key) for i, t in enumerate(turns)]


def _openai_message(turn: Any, i: int, key: str) -> Message:
    if not isinstance(turn, Mapping) or "role" not in turn:
        raise DataError(f"{key}[{i}] is not a message with a 'role' and 'content'")
    return _message(turn.get("role"), _content(turn.get("content"), f"{key}[{i}].content"), f"{key}[{i}].role")


def _sharegpt_message(turn: Any, i: int, key: str) -> Message:
    if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
        raise DataError(f"{key}[{i}] is not a ShareGPT turn with 'from' and 'value'")
    speaker = str(turn["from"]).lower()
    role = SHAREGPT_ROLES.get(speaker)
    if role is None:
        raise DataError(f"{key}[{i}].from: unknown speaker {str(turn['from'])[:40]!r} "
                        f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
    return {"role": role, "content": _content(turn["value"], f"{key}[{i}].value")}


def _alpaca(row: Mapping[str, Any]) -> list[Message]:
    instruction = _content(row.get("instruction"), "instruction")
    extra = row.get("input")
    prompt = instruction if extra in (None, "") else f"{instruction}\n\n{_content(extra, 'input')}"
    messages = [{"role": "system", "content": _content(row["system"], "system")}] if row.get("system") else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": _content(row.get("output"), "output")}]


def _message(role: Any, content: str, where: str) -> Message:
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {str(role)[:40]!r} (roles: {', '.join(ROLES)})")
    return {"role": role, "content": content}


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts (the ``text`` parts joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, Mapping) for p in value):
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    if value is None:
        raise DataError(f"{where} is missing")
    raise DataError(f"{where} must be text, got {type(value).__name__}")


def check_messages(messages: Sequence[Mapping[str, Any]], where: str = "messages") -> list[Message]:
    """Request-side messages (a server's, a host's caller's) as ``[{"role", "content"}]``."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError(f"{where} must be a non-empty list of messages")
    return [_openai_message(m, i, where) for i, m in enumerate(messages)]


# --------------------------------------------------------------------------------------------
# Templates, spans and masks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Where one message sits in a rendering: ``[start, content)`` is the template's opening
    (role header), ``[content, close)`` the content as rendered, ``[close, end)`` the
    closing text (end-of-turn token and separators) up to where the next message starts."""

    role: str
    start: int
    content: int
    close: int
    end: int
    opening: int  # an assistant message's prompt end: the rendering before it plus the generation prompt


    def end_of_turn(self, text: str) -> int:
        """The end of the closing text without its trailing whitespace: what a model must
        generate to end its turn (``<|im_end|>`` but not the newline after it)."""
        closing = text[self.close:self.end]
        return self.close + len(closing.rstrip())


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's exact Jinja ``text``; ``sha256`` is its hash, recorded with it."""

    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @classmethod
    def resolve(cls, name: str, tokenizer: Any, *, text: str | None = None) -> ChatTemplate:
        """``text`` when given (a manifest's, a file's); else a built-in by name; else, for
        ``tokenizer``, the base tokenizer's own template (a one-line error when it has none)."""
        if text is not None:
            return cls(text)
        if name in BUILTIN_TEMPLATES:
            return cls(BUILTIN_TEMPLATES[name])
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not isinstance(own, str) or not own:
            raise DataError(f"the base model's tokenizer has no chat template; set task.template to "
                            f"{' or '.join(BUILTIN_TEMPLATES)} or to a .jinja file")
        return cls(own)

    def render(self, messages: Sequence[Message], tokenizer: Any, *, generation_prompt: bool = False) -> str:
        """The template applied to ``messages`` (with the assistant's opening when
        ``generation_prompt``); a template's own refusal (``raise_exception``) or error is a
        one-line :class:`DataError`."""
        try:
            return tokenizer.apply_chat_template(list(messages), chat_template=self.text, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja's errors have many classes
            raise DataError(f"the chat template refused this conversation ({type(exc).__name__}: {str(exc)[:160]})") from None

    def spans(self, messages: Sequence[Message], tokenizer: Any) -> tuple[str, list[Span]]:
        """The rendering of ``messages`` and each message's :class:`Span` in it (see the
        module docstring). Costs three renderings of each prefix."""
        full = self.render(messages, tokenizer)
        spans, start = [], 0
        for i, message in enumerate(messages):
            done = self.render(messages[: i + 1], tokenizer)
            one, two = (self.render([*messages[:i], {**message, "content": p}], tokenizer) for p in PROBES)
            content = _first_difference(one, two)
            if content is None or not full.startswith(done) or content < start:
                raise DataError(f"the chat template is not prefix-stable at message {i + 1} (it rewrites earlier "
                                "turns when a later one is added), so no loss mask would be right for it; "
                                "choose another template (task.template)")
            closing = len(one) - content - 1  # what the template writes after the content
            close = len(done) - closing
            if close < content:
                raise DataError(f"message {i + 1}: the chat template does not keep the message's content in its text")
            opening = content
            if message["role"] == "assistant":  # where a generation for this message would start
                prompt = self.prompt(messages[:i], tokenizer)
                if not done.startswith(prompt) or not start <= len(prompt) <= content:
                    raise DataError(f"the chat template's generation prompt does not open message {i + 1} as the "
                                    "message itself is rendered, so training and inference would differ; "
                                    "choose another template (task.template)")
                opening = len(prompt)
            spans.append(Span(message["role"], start, content, close, len(done), opening))
            start = len(done)
        return full, spans

    def prompt(self, messages: Sequence[Message], tokenizer: Any) -> str:
        """The text a model continues to answer ``messages``: their rendering plus the
        assistant's opening, exactly the prefix training saw before that answer."""
        return self.render(messages, tokenizer, generation_prompt=True)


def _first_difference(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token, whether its characters ``[a, b)`` overlap one of the character ``spans``
    (sorted, non-overlapping). A token that straddles a span's edge counts as inside."""
    out, k = [], 0
    for a, b in offsets:
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        out.append(k < len(spans) and a < spans[k][1] and max(b, a + 1) > spans[k][0])
    return out


def tokenize_with_offsets(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s ids (no special tokens added: the template writes them) and character
    offsets; a slow tokenizer without offsets is a one-line error."""
    if not text:
        return [], []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError("chat masking needs a fast tokenizer (one with offsets); this base has a slow one") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def cut_points(spans: Sequence[Span]) -> list[int]:
    """Where a rendering is split before tokenizing: every message's start and every
    assistant message's prompt end. Training and inference tokenize the same pieces, so a
    prompt at inference is, token for token, the prefix training saw (a BPE merge can never
    join the generation prompt to the answer after it)."""
    return sorted({s.start for s in spans} | {s.opening for s in spans if s.role == "assistant"})


def tokenize_pieces(text: str, cuts: Sequence[int], tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """``text`` tokenized piece by piece between ``cuts`` (character positions), the
    offsets shifted back into ``text``."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    bounds = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    for a, b in zip(bounds, bounds[1:]):
        piece_ids, piece_offsets = tokenize_with_offsets(text[a:b], tokenizer)
        ids += piece_ids
        offsets += [(x + a, y + a) for x, y in piece_offsets]
    return ids, offsets


__all__ = [
    "BUILTIN_TEMPLATES", "ChatTemplate", "FORMATS", "FORMAT_KEYS", "Format", "Message", "ROLES", "Span",
    "check_messages", "describe_formats", "cut_points", "detect_format", "format_keys", "to_messages", "token_mask", "tokenize_pieces", "tokenize_with_offsets",
]
