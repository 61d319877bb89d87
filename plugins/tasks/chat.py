"""``chat``: train a language model on conversations, the loss on the assistant's turns.

Rows are conversations in the OpenAI ``messages`` shape, ShareGPT's ``conversations``
(``from``/``value``) or Alpaca's ``instruction``/``input``/``output``: ``format: auto`` (the
default) tells them apart row by row and says what it found; ``format: openai|sharegpt|alpaca``
insists. Each conversation is rendered with a chat template:

``template: tokenizer`` (default)
    the base tokenizer's own chat template;
``template: chatml`` / ``template: llama-3``
    a built-in one;
``template: path/to/template.jinja``
    a Jinja file, relative to the recipe's folder (read at validation).

The template's exact text and its SHA-256 go into the adapter's manifest, and a host renders
chat requests to the adapter with it (:meth:`Chat.encode_chat`), so inference sees what
training saw, token for token.

The loss covers the content of every message whose role is in ``roles`` (default
``[assistant]``), plus its end-of-turn token (``train_end_of_turn``, default true: a model that
never learned to end its turn runs on); ``last_turn_only`` trains the last such message only.
The trained positions come from where the template puts each message (rendering with probes,
:meth:`~plugtune.sdk.ChatTemplate.spans`) mapped onto token offsets, never from searching
for the text. ``system`` adds a system message to conversations (and requests) that have none.

A conversation longer than ``training.max_length`` keeps its first whole turns, up to the last
trained message that fits (the encoded row records ``turns_cut``); only when even the first
exchange does not fit is it cut inside a turn.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from plugtune import hookimpl
from plugtune.sdk import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ComponentOptions,
    DataError,
    EvalBatch,
    Example,
    Head,
    IGNORE_INDEX,
    LabelPositions,
    Task,
    check_messages,
    collate,
    cut_points,
    describe_formats,
    detect_format,
    eval_batch_from_label_logits,
    format_keys,
    open_regular,
    to_messages,
    token_mask,
    tokenize_pieces,
    tokenize_with_offsets,
)

if TYPE_CHECKING:
    import torch

TEMPLATE_NAMES = ("tokenizer", *BUILTIN_TEMPLATES)
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template file; the longest shipped ones are a few KB
ROLE_NAMES = ("system", "user", "assistant", "tool")


class TemplateOptions(ComponentOptions):
    """The chat-template options of every task that renders conversations (``chat``, and
    ``preference`` for rows in messages): which template, its recorded text and hash, and a
    default system message."""

    template: str = Field("tokenizer", description="tokenizer | chatml | llama-3 | path to a .jinja file")
    template_text: str | None = Field(None, description="the template's Jinja text (filled from template; recorded in manifests)")
    template_sha256: str | None = None
    system: str | None = Field(None, description="system message for conversations that have none")

    @field_validator("template")
    @classmethod
    def _known_or_file(cls, value: str, info: ValidationInfo) -> str:
        if value in TEMPLATE_NAMES:
            return value
        if _is_path(value):  # read and parsed here, so a problem is reported at task.template
            _check_jinja(_read_template_file(value, _base_dir(info)))
            return value
        close = [n for n in TEMPLATE_NAMES if n.replace("-", "") == value.lower().replace("-", "").replace("_", "")]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown chat template {value[:60]!r}{hint} (built-in: {', '.join(TEMPLATE_NAMES)}; "
                         "or a path to a .jinja file)")

    @model_validator(mode="after")
    def _read_template(self, info: ValidationInfo) -> TemplateOptions:
        """A file template is read now, so a missing file or bad Jinja fails validation and the
        manifest records the text; recorded text must match its recorded hash."""
        if self.template_text is None and _is_path(self.template):
            self.__dict__["template_text"] = _read_template_file(self.template, _base_dir(info))  # no re-validation loop
        if self.template_text is not None:
            _check_jinja(self.template_text)
            digest = ChatTemplate(self.template_text).sha256
            if self.template_sha256 is not None and self.template_sha256 != digest:
                raise ValueError("template_sha256 does not match template_text (the manifest was edited or damaged)")
            self.__dict__["template_sha256"] = digest
        return self


class ChatOptions(TemplateOptions):
    format: Literal["auto", "openai", "sharegpt", "alpaca"] = "auto"
    messages: str = Field("messages", min_length=1, description="the column holding the OpenAI-style list of messages")
    roles: list[Literal["system", "user", "assistant", "tool"]] = Field(default_factory=lambda: ["assistant"], min_length=1)
    last_turn_only: bool = False
    train_end_of_turn: bool = True


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


def _is_path(value: str) -> bool:
    return value.endswith((".jinja", ".j2", ".jinja2")) or "/" in value


def _read_template_file(value: str, base: Path) -> str:
    path = Path(value) if Path(value).is_absolute() else base / value
    try:
        with open_regular(path) as fh:
            data = fh.read(MAX_TEMPLATE_BYTES + 1)
    except DataError as exc:
        raise ValueError(f"{exc} (template paths are relative to the recipe's folder)") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise ValueError(f"{path}: a chat template of more than {MAX_TEMPLATE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _check_jinja(text: str) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None


class Chat(Task):
    """Conversations rendered with a chat template; the loss on the chosen roles' turns."""

    Options = ChatOptions
    head: ClassVar[Head] = "lm"
    labels = None
    generates = True

    def __init__(self, options: ChatOptions, name: str) -> None:
        self.type = name
        self.options = options
        self.template: ChatTemplate | None = ChatTemplate(options.template_text) if options.template_text else None
        self.formats: Counter[str] = Counter()

    # -- rows ---------------------------------------------------------------------------

    def required_fields(self) -> set[str]:
        """The canonical rows' one field: ``normalize`` turns every format into it."""
        return {"messages"}

    def check_columns(self, columns: list[str]) -> list[str]:
        fmt = self.options.format
        if fmt == "auto":
            probe = {c: None for c in columns}
            if detect_format(probe, self.options.messages) is None:
                return [f"format: the columns ({', '.join(columns) or 'none'}) fit none of the conversation formats: "
                        f"{describe_formats(self.options.messages)}; rename them with data.options.columns"]
            return []
        missing = [c for c in format_keys(fmt, self.options.messages) if c not in columns]
        return [f"format: {fmt} needs column {c!r} (columns: {', '.join(columns) or 'none'}); "
                f"rename it with data.options.columns" for c in missing]

    def normalize(self, example: Example) -> Example:
        """``example`` as ``{"messages": [{"role", "content"}, ...]}`` (its other keys kept)."""
        if self.options.format in {"auto", "openai"} and _canonical(example.get(self.options.messages)):
            self.formats["openai"] += 1
            messages = example[self.options.messages]
            return example if self.options.messages == "messages" else {
                **{k: v for k, v in example.items() if k != self.options.messages}, "messages": messages}
        fmt = self.options.format if self.options.format != "auto" else detect_format(example, self.options.messages)
        if fmt is None:
            raise DataError(f"fits none of the conversation formats: {describe_formats(self.options.messages)} "
                            f"(keys: {', '.join(map(str, example)) or 'none'})")
        missing = [k for k in format_keys(fmt, self.options.messages) if k not in example]
        if missing:
            raise DataError(f"not {'an' if fmt[0] in 'ao' else 'a'} {fmt} row: it has no {missing[0]!r} (keys: {', '.join(map(str, example)) or 'none'}); "
                            "set task.format, or rename columns with data.options.columns")
        self.formats[fmt] += 1
        messages = to_messages(example, fmt, self.options.messages)
        rest = {k: v for k, v in example.items() if k not in {self.options.messages, "conversations"}}
        return {**rest, "messages": messages}

    def notes(self) -> list[str]:
        if not self.formats:
            return []
        found = ", ".join(f"{fmt} ({n} rows)" for fmt, n in self.formats.most_common())
        how = "detected" if self.options.format == "auto" else "read"
        return [f"chat: {how} conversation format {found}"]

    def setup(self, train: list[Example]) -> None:
        """Nothing to learn from the data: the template says everything."""

    def _messages(self, example: Example) -> list[dict[str, str]]:
        messages = example.get("messages")
        if not _canonical(messages):  # a row that skipped normalize (plugtune eval on raw rows)
            messages = self.normalize(example)["messages"]
        if self.options.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.options.system}, *messages]
        return messages

    # -- the template -------------------------------------------------------------------

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Resolve the template against the base tokenizer (its own one, for ``tokenizer``)
        and record its text, so the manifest and every host use exactly this one."""
        if self.template is None:
            self.template = ChatTemplate.resolve(self.options.template, tokenizer)
            self.options = self.options.model_copy(update={"template_text": self.template.text,
                                                           "template_sha256": self.template.sha256})

    def _bound(self, tokenizer: Any) -> ChatTemplate:
        if self.template is None:
            self.bind_tokenizer(tokenizer)
        assert self.template is not None
        return self.template

    # -- encoding -----------------------------------------------------------------------

    def encode(self, example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        messages = self._messages(example)
        template = self._bound(tokenizer)
        text, spans = template.spans(messages, tokenizer)
        ids, offsets = tokenize_pieces(text, cut_points(spans), tokenizer)
        ends = _token_ends(offsets, [s.end for s in spans])  # tokens up to each message's end
        trainable = [i for i, s in enumerate(spans) if s.role in self.options.roles]
        if not trainable:
            raise DataError(f"no message with a trained role ({', '.join(self.options.roles)}) in this conversation")
        kept, turns_cut = len(spans), 0
        if len(ids) > max_length:
            fitting = [i for i in trainable if ends[i] <= max_length]
            if fitting:  # whole turns, up to the last trained message that fits
                kept = fitting[-1] + 1
                turns_cut = len(spans) - kept
                ids, offsets = ids[: ends[kept - 1]], offsets[: ends[kept - 1]]
            else:  # even the first exchange does not fit: cut inside it
                ids, offsets = ids[:max_length], offsets[:max_length]
                turns_cut = sum(1 for e in ends if e > max_length)
        trained = [i for i in trainable if i < kept]
        if self.options.last_turn_only:
            trained = trained[-1:]
        char_spans = [(spans[i].content, spans[i].end_of_turn(text) if self.options.train_end_of_turn else spans[i].close)
                      for i in trained]
        mask = token_mask(offsets, char_spans)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        return {"input_ids": ids, "labels": labels, "turns_cut": [turns_cut]}  # on every row: the cache keeps one layout

    def collate(self, rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(rows, pad_id, classification=False)

    def eval_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalBatch:
        labels = batch["labels"]  # (B, T): logits at t predict labels at t + 1
        positions = LabelPositions.of(labels)
        logits = logits[:, logits.size(1) - labels.size(1):]  # leading virtual tokens predict nothing
        return eval_batch_from_label_logits(logits[positions.rows, positions.columns], positions)

    # -- generation and serving ---------------------------------------------------------

    def _answer(self, messages: list[dict[str, str]]) -> int:
        """The index of the message generation evaluators answer: the last trained one."""
        trained = [i for i, m in enumerate(messages) if m["role"] in self.options.roles]
        if not trained:
            raise DataError(f"no message with a trained role ({', '.join(self.options.roles)}) to compare with")
        return trained[-1]

    def encode_prompt(self, example: Example, tokenizer: Any) -> list[int]:
        """The conversation up to its last trained message, with the assistant's opening."""
        messages = self._messages(example)
        return self._prompt_ids(messages[: self._answer(messages)], tokenizer)

    def reference_text(self, example: Example) -> str | None:
        messages = self._messages(example)
        return messages[self._answer(messages)]["content"].strip()

    def format_prompt(self, text: str) -> str | None:
        """A raw prompt is one user message; hosts encode it through :meth:`encode_chat`."""
        return None

    def encode_chat(self, messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
        """A chat request's prompt ids, rendered as training rendered the conversation."""
        messages = check_messages(messages)
        if self.options.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.options.system}, *messages]
        return self._prompt_ids(messages, tokenizer)

    def _prompt_ids(self, messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
        """The prompt tokenized in the pieces training used (:func:`~plugtune.sdk.cut_points`):
        the messages' starts and the generation prompt's."""
        template = self._bound(tokenizer)
        text = template.prompt(messages, tokenizer)
        if not messages:
            return tokenize_with_offsets(text, tokenizer)[0]
        cuts = cut_points(template.spans(messages, tokenizer)[1])
        return tokenize_pieces(text, [*cuts, len(template.render(messages, tokenizer))], tokenizer)[0]

    def end_of_turn_ids(self, tokenizer: Any) -> set[int]:
        """The tokens that close an assistant turn in this template (``<|im_end|>``): the
        closing text of a probe answer, when it is a single token."""
        template = self._bound(tokenizer)
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        try:
            text, spans = template.spans(probe, tokenizer)
        except DataError:
            return set()
        closing = text[spans[-1].close: spans[-1].end_of_turn(text)]
        ids = tokenize_with_offsets(closing, tokenizer)[0] if closing else []
        return set(ids) if len(ids) == 1 else set()

    # -- identity -----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.options.model_dump(mode="json")}


def _canonical(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLE_NAMES and isinstance(m["content"], str)
        for m in messages)


def _token_ends(offsets: list[tuple[int, int]], char_ends: list[int]) -> list[int]:
    """For each character end, how many tokens start before it (the token count of the
    rendering up to there)."""
    out, k = [], 0
    for end in char_ends:
        while k < len(offsets) and offsets[k][0] < end:
            k += 1
        out.append(k)
    return out


@hookimpl
def register_tasks(register: Any) -> None:
    register("chat", Chat)
