"""Structured output (plugtune.serving.constraints): grammars through xgrammar, driven here the
way the decode engine drives them (batched masks over random logits, then a token per row),
but picking *uniformly* among the tokens the mask leaves: a random walk through the grammar
finds the holes a model's preferences would hide.

Run on SmolLM2's real tokenizer (byte-level BPE, 49,152 tokens, special tokens that are not
stop tokens) when it is converted on this machine, and always on a tiny byte-level BPE
trained here (so the tests run without the model), each with a padded model vocabulary.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from plugtune.serving.constraints import (  # noqa: E402
    ConstraintCompiler,
    ConstraintSpec,
    TokenConstraint,
    apply_constraints,
    build_constraint,
    constraint_from_request,
)

PAD = 64  # rows of the model's output matrix beyond the tokenizer (as padded embeddings have)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def _smollm2_tokenizer() -> Any:
    from plugtune.artifacts.models import converted_folder, local_location

    location = local_location("smollm2-135m")
    if location is None:
        pytest.skip("smollm2-135m is not fetched (plugtune fetch smollm2-135m)")
    folder = converted_folder(location) if location.is_file() else location
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"smollm2-135m's converted folder is absent ({folder})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _tiny_bpe_tokenizer() -> Any:
    """A byte-level BPE of a few hundred tokens trained on JSON-ish text, with EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ['{"name": "Ada", "age": 36, "tags": ["x", "y"]}', '{"kind": "cat", "owner": {"id": 7}}',
              "yes no maybe positive negative AB-123 CD-4567 hello world", "true false null [1, 2, 3]"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", bos_token="<s>")


@pytest.fixture(scope="module", params=["smollm2", "tiny-bpe"])
def compiler(request) -> ConstraintCompiler:
    tokenizer = _smollm2_tokenizer() if request.param == "smollm2" else _tiny_bpe_tokenizer()
    built = ConstraintCompiler(tokenizer, vocab_size=len(tokenizer) + PAD, stop_token_ids=[tokenizer.eos_token_id])
    built.tokenizer = tokenizer  # for the tests' decoding
    return built


# --------------------------------------------------------------------------------------------
# The engine's loop, with a uniform pick among the allowed tokens
# --------------------------------------------------------------------------------------------

def random_walks(compiler: ConstraintCompiler, factory, runs: int, *, seed: int = 0, batch: int = 50,
                 max_steps: int = 400) -> list[str]:
    """``runs`` rows, ``batch`` at a time beside two unconstrained rows: per step one
    apply_constraints over random logits, then each row takes the top token, which for
    i.i.d. uniform logits is a uniform pick among those left finite; until a stop token or
    ``finished``. Returns the decoded texts."""
    g = torch.Generator().manual_seed(seed)
    stops = set(compiler.stop_token_ids)
    texts: list[str] = []
    for start in range(0, runs, batch):
        rows = [factory() for _ in range(min(batch, runs - start))]
        at = [1 + r + (r >= len(rows) // 2) for r in range(len(rows))]  # rows 0 and the middle stay unconstrained
        slots: list[TokenConstraint | None] = [None] * (len(rows) + 2)
        taken: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_steps):
            if all(done):
                break
            for r, row in enumerate(rows):
                slots[at[r]] = None if done[r] else row
            logits = torch.rand(len(slots), compiler.vocab_size, generator=g)  # i.i.d. uniform scores
            free = logits[0].clone()
            apply_constraints(logits, slots)
            assert torch.equal(logits[0], free)  # an unconstrained row is left alone
            picks = logits.argmax(-1).tolist()  # the top of i.i.d. scores: uniform among the allowed tokens
            for r, row in enumerate(rows):
                if done[r]:
                    continue
                token = picks[at[r]]
                assert torch.isfinite(logits[at[r], token])
                row.accept(token)
                if token in stops:
                    done[r] = True
                else:
                    taken[r].append(token)
                done[r] = done[r] or row.finished
        assert all(done), f"{done.count(False)} rows still running after {max_steps} steps"
        texts += [compiler.tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False) for t in taken]
    return texts


# --------------------------------------------------------------------------------------------
# JSON schema: 100 random walks, every one valid
# --------------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 3, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0}, "vip": {"type": "boolean"}},
            "required": ["id", "vip"],
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
}


def _valid(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """A hand check of the keywords SCHEMA uses (jsonschema is not a dependency)."""
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), where
        assert set(schema.get("required", ())) <= set(value), f"{where}: missing {set(schema['required']) - set(value)}"
        assert set(value) <= set(schema["properties"]), f"{where}: undeclared {set(value) - set(schema['properties'])}"
        for key, item in value.items():
            _valid(item, schema["properties"][key], f"{where}.{key}")
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value)), where
        for k, item in enumerate(value):
            _valid(item, schema["items"], f"{where}[{k}]")
    elif kind == "string":
        assert isinstance(value, str) and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)), \
            f"{where}: {value!r}"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{where}: {value}"
    elif kind == "boolean":
        assert isinstance(value, bool), where


def test_a_hundred_random_walks_through_a_nested_schema_all_give_valid_json(compiler) -> None:
    spec = constraint_from_request({"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}})
    texts = random_walks(compiler, build_constraint(spec, compiler), 100)
    assert len(texts) == 100
    for text in texts:
        value = json.loads(text)  # strict: a raw control character in a string fails here
        _valid(value, SCHEMA)
        assert "\n" not in text and text == text.strip()  # one line, no whitespace around it
    assert len({json.loads(t)["kind"] for t in texts}) == 3  # the walk explores: every enum value shows up


def test_length_bounded_strings_refuse_raw_control_characters_and_keep_escapes(compiler) -> None:
    """xgrammar 0.2.8 lets a length-bounded string take a raw U+0002 and no escape
    (mlc-ai/xgrammar#800); the compiler repairs the grammar."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}, "required": ["s"]}
    row = compiler.json_schema(schema)()
    assert row._matcher.accept_string('{"s": "')
    assert not row._matcher.fork().accept_string("\x02")
    assert not row._matcher.fork().accept_string("\t")
    assert row._matcher.accept_string('a\\"\\n"}')  # two escapes count as two of the three characters
    assert json.loads('{"s": "a\\"\\n"}') == {"s": 'a"\n'}
    assert row.finished


@pytest.mark.parametrize("kind, value, before", [
    ("json_schema", SCHEMA, '{"name": "'), ("json_schema", {"type": "string"}, '"'), ("json_object", None, '{"a": "'),
    ("regex", ".+", ""), ("regex", "[^a]+", ""), ("grammar", "root ::= [^0-9]+", ""),
])
def test_no_grammar_lets_bytes_spell_a_surrogate(compiler, kind, value, before) -> None:
    """xgrammar 0.2.8 takes ED A0 80 (U+D800 encoded, not UTF-8) as a character of a negated
    class or a regex's dot; a byte-level tokenizer's byte tokens could spell it."""
    factory = compiler.json_object() if kind == "json_object" else getattr(compiler, kind)(value)
    matcher = factory()._matcher
    assert matcher.accept_string(before)
    assert not matcher.fork().accept_string(b"\xed\xa0\x80") and not matcher.fork().accept_string(b"\xed\xbf\xbf")
    assert matcher.fork().accept_string("\ud7ff\ue000".encode()) and matcher.fork().accept_string("😀".encode())


def test_json_object_allows_any_object_and_only_an_object(compiler) -> None:
    tok = compiler.tokenizer
    factory = build_constraint(constraint_from_request({"response_format": {"type": "json_object"}}), compiler)
    row = factory()
    logits = torch.zeros(1, compiler.vocab_size)
    apply_constraints(logits, [row])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    starts = {tok.decode([t], clean_up_tokenization_spaces=False)[:1] for t in allowed}
    assert starts == {"{"}  # no array, no scalar, no leading whitespace
    text = '{"a": [1, {"b": null}], "c": "d"}'
    for token in tok.encode(text, add_special_tokens=False):
        row.accept(token)
    assert row.finished and json.loads(text)


def test_json_is_generated_without_free_whitespace(compiler) -> None:
    row = compiler.json_schema(SCHEMA)()
    row._matcher.accept_string("{")
    logits = torch.zeros(1, compiler.vocab_size)
    apply_constraints(logits, [row])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(not compiler.tokenizer.decode([t])[:1].isspace() for t in allowed)


# --------------------------------------------------------------------------------------------
# Choice and regex
# --------------------------------------------------------------------------------------------

def test_choice_gives_exactly_one_of_the_options(compiler) -> None:
    options = ["yes", "yes please", "no", 'say "hi"', "naïve"]
    texts = random_walks(compiler, compiler.choice(options), 60, seed=1)
    assert set(texts) <= set(options)
    assert len(set(texts)) >= 3


def test_a_choice_is_finished_once_nothing_but_a_stop_token_may_follow(compiler) -> None:
    tok = compiler.tokenizer
    row = compiler.choice(["yes", "yes please"])()
    for token in tok.encode("yes", add_special_tokens=False):
        assert not row.finished
        row.accept(token)
    assert not row.finished  # " please" may still follow, and so may a stop token
    logits = torch.zeros(1, compiler.vocab_size)
    apply_constraints(logits, [row])
    assert torch.isfinite(logits[0, list(compiler.stop_token_ids)]).all()
    for token in tok.encode(" please", add_special_tokens=False):
        row.accept(token)
    assert row.finished
    logits = torch.zeros(1, compiler.vocab_size)
    apply_constraints(logits, [row])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == list(compiler.stop_token_ids)


def test_regex_output_matches_the_pattern_as_a_whole(compiler) -> None:
    pattern = r"[A-Z]{2}-\d{3,5}( (ok|late))?"
    texts = random_walks(compiler, build_constraint(constraint_from_request({"guided_regex": pattern}), compiler), 60, seed=2)
    assert all(re.fullmatch(pattern, t) for t in texts), [t for t in texts if not re.fullmatch(pattern, t)]


def test_a_token_the_grammar_does_not_allow_is_refused_and_the_state_kept(compiler) -> None:
    tok = compiler.tokenizer
    row = compiler.choice(["yes"])()
    wrong = tok.encode("no", add_special_tokens=False)[0]
    with pytest.raises(ValueError, match=f"token {wrong} is not allowed"):
        row.accept(wrong)
    for token in tok.encode("yes", add_special_tokens=False):
        row.accept(token)
    assert row.finished


# --------------------------------------------------------------------------------------------
# The mask: padding, special tokens, unconstrained rows, wider logits
# --------------------------------------------------------------------------------------------

def test_padding_rows_special_tokens_and_unconstrained_rows(compiler) -> None:
    tok = compiler.tokenizer
    logits = torch.randn(3, compiler.vocab_size)
    before = logits.clone()
    apply_constraints(logits, [None, compiler.regex(r"(.|\n)*")(), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])  # untouched
    assert torch.isinf(logits[1, len(tok):]).all()  # the model's padding rows
    hidden = sorted(ConstraintCompiler._special_ids(tok) - set(compiler.stop_token_ids))
    assert hidden and torch.isinf(logits[1, hidden]).all()  # <|im_start|>, <pad>, ...: never as text
    assert torch.isfinite(logits[1, list(compiler.stop_token_ids)]).all()
    assert torch.isfinite(logits[1]).sum() > len(tok) // 2


def test_logits_wider_than_the_compilers_vocabulary_are_masked_past_it(compiler) -> None:
    logits = torch.zeros(2, compiler.vocab_size + 5, dtype=torch.bfloat16)
    apply_constraints(logits, [compiler.choice(["no"])(), None])
    assert torch.isinf(logits[0, compiler.vocab_size:]).all() and (logits[1] == 0).all()
    with pytest.raises(ValueError, match="build the ConstraintCompiler with the model's vocab_size"):
        apply_constraints(torch.zeros(1, compiler.vocab_size - 1), [compiler.choice(["no"])()])


def test_the_last_position_of_a_forwards_logits_is_masked_in_place(compiler) -> None:
    """The engine passes ``logits[:, -1]`` of a (rows, positions, V) forward output: a view."""
    output = torch.randn(3, 4, compiler.vocab_size)
    earlier = output[:, :-1].clone()
    apply_constraints(output[:, -1], [compiler.choice(["no"])(), None, compiler.choice(["yes"])()])
    for row, word in ((0, "no"), (2, "yes")):
        allowed = torch.isfinite(output[row, -1]).nonzero().flatten().tolist()
        assert allowed and all(word.startswith(compiler.tokenizer.decode([t])) for t in allowed)
        assert compiler.tokenizer.encode(word, add_special_tokens=False)[0] in allowed
    assert torch.isfinite(output[1, -1]).all() and torch.equal(output[:, :-1], earlier)


def test_a_terminated_row_allows_only_stop_tokens(compiler) -> None:
    row = compiler.choice(["no"])()
    for token in compiler.tokenizer.encode("no", add_special_tokens=False):
        row.accept(token)
    row.accept(compiler.stop_token_ids[0])
    assert row.finished and row.terminated
    logits = torch.zeros(1, compiler.vocab_size)
    apply_constraints(logits, [row])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == list(compiler.stop_token_ids)


# --------------------------------------------------------------------------------------------
# The compiler: cache, threads, refusals
# --------------------------------------------------------------------------------------------

def test_the_cache_compiles_each_value_once_and_evicts_the_least_recent() -> None:
    small = ConstraintCompiler(_tiny_bpe_tokenizer(), vocab_size=400 + PAD, cache_size=2)
    small.regex("a+"), small.regex("a+"), small.json_schema({"type": "integer"}), small.json_schema('{"type":"integer"}')
    assert (small.misses, small.hits, small.cached()) == (2, 2, 2)
    small.regex("b+")  # evicts "a+" (least recent: the schema was used after it)
    small.json_schema({"type": "integer"})
    assert (small.misses, small.hits) == (3, 3)
    small.regex("a+")
    assert small.misses == 4 and small.cached() == 2


def test_compiles_on_several_threads_while_the_worker_masks() -> None:
    tokenizer = _tiny_bpe_tokenizer()
    shared = ConstraintCompiler(tokenizer, vocab_size=len(tokenizer) + PAD)
    errors: list[BaseException] = []
    factories: list[Any] = []

    def request(k: int) -> None:
        try:
            for j in range(6):
                factories.append(shared.json_schema({"type": "object", "properties": {f"k{k}_{j % 3}": {"enum": [j % 3]}},
                                                     "required": [f"k{k}_{j % 3}"]}))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=request, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    worker = [shared.choice(["yes", "no"])() for _ in range(4)]
    for _ in range(20):
        apply_constraints(torch.randn(4, shared.vocab_size), worker)
    for t in threads:
        t.join()
    assert not errors and len(factories) == 24 and shared.misses == 4 * 3 + 1
    texts = random_walks(_with_tokenizer(shared, tokenizer), factories[0], 2)
    assert all(json.loads(t) for t in texts)


def _with_tokenizer(compiler: ConstraintCompiler, tokenizer: Any) -> ConstraintCompiler:
    compiler.tokenizer = tokenizer
    return compiler


# --------------------------------------------------------------------------------------------
# Requests: what is read, what is refused (one line, naming the field)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": None, "guided_json": None}, None),
    ({"response_format": {"type": "json_object"}}, ConstraintSpec("json_object", None, "response_format")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}},
     ConstraintSpec("json_schema", '{"type":"integer"}', "response_format.json_schema.schema")),
    ({"guided_json": '{"type": "integer"}'}, ConstraintSpec("json_schema", '{"type":"integer"}', "guided_json")),
    ({"guided_json": {"type": "integer"}, "guided_decoding_backend": "xgrammar"},
     ConstraintSpec("json_schema", '{"type":"integer"}', "guided_json")),
    ({"guided_regex": "a|b"}, ConstraintSpec("regex", "a|b", "guided_regex")),
    ({"guided_choice": ["a", "b"]}, ConstraintSpec("choice", ("a", "b"), "guided_choice")),
    ({"guided_grammar": 'root ::= "a"'}, ConstraintSpec("grammar", 'root ::= "a"', "guided_grammar")),
    ({"structured_outputs": {"choice": ["a"], "regex": None}}, ConstraintSpec("choice", ("a",), "structured_outputs.choice")),
    ({"structured_outputs": {"json": {"type": "integer"}}}, ConstraintSpec("json_schema", '{"type":"integer"}', "structured_outputs.json")),
    ({"structured_outputs": {"json_object": True}}, ConstraintSpec("json_object", None, "structured_outputs.json_object")),
    ({"response_format": {"type": "text"}, "guided_choice": ["a"]}, ConstraintSpec("choice", ("a",), "guided_choice")),
])
def test_requests_are_read_into_a_spec(body, expected) -> None:
    assert constraint_from_request(body) == expected


@pytest.mark.parametrize("body, message", [
    ({"response_format": "json"}, r"^response_format: give an object"),
    ({"response_format": {"type": "xml"}}, r"^response_format\.type: 'xml' is not supported"),
    ({"response_format": {"type": "json_schema"}}, r"^response_format\.json_schema: give an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, r"^response_format\.json_schema\.schema: required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     r"^response_format\.json_schema\.schema: a JSON schema must be a JSON object, got list"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     r"^response_format\.json_schema\.strict: give true or false"),
    ({"guided_json": "{not json"}, r"^guided_json: not valid JSON \(Expecting property name"),
    ({"guided_choice": []}, r"^guided_choice: give a non-empty list of strings"),
    ({"guided_choice": "a"}, r"^guided_choice: give a non-empty list of strings"),
    ({"guided_choice": ["a", 3]}, r"^guided_choice\[1\]: each choice must be a non-empty string, got 3"),
    ({"guided_choice": ["a", ""]}, r"^guided_choice\[1\]: each choice must be a non-empty string"),
    ({"guided_regex": ""}, r"^guided_regex: give a non-empty string"),
    ({"structured_outputs": ["a"]}, r"^structured_outputs: give an object"),
    ({"structured_outputs": {"structural_tag": "x"}}, r"^structured_outputs\.structural_tag: not supported \(use one of json, regex"),
    ({"structured_outputs": {"json_object": "yes"}}, r"^structured_outputs\.json_object: give true or false"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"},
     r"^response_format and guided_regex: give one structured-output constraint, not 2"),
    ({"guided_choice": ["a"], "structured_outputs": {"regex": "a"}},
     r"^guided_choice and structured_outputs\.regex: give one structured-output constraint"),
])
def test_malformed_requests_are_one_line_errors_naming_the_field(body, message) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        constraint_from_request(body)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     r'^response_format\.json_schema\.schema: invalid JSON schema: Unsupported type "nope"$'),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}},
     r"^guided_json: invalid JSON schema: Cannot find field '?defs'? in #/defs/x$"),  # xgrammar 0.2.x quotes the name in later builds
    ({"guided_regex": "a(b"}, r"^guided_regex: invalid regex: Regex parsing error at position 4: The parenthesis is not closed\.$"),
    ({"structured_outputs": {"regex": "(?<=x)y"}}, r"^structured_outputs\.regex: invalid regex: .*Lookbehind is not supported"),
    ({"guided_grammar": "root ::= "}, r"^guided_grammar: invalid EBNF grammar: "),
])
def test_what_xgrammar_refuses_to_compile_is_a_one_line_error_naming_the_field(body, message) -> None:
    tokenizer = _tiny_bpe_tokenizer()
    compiler = ConstraintCompiler(tokenizer, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=message) as caught:
        build_constraint(constraint_from_request(body), compiler)
    assert "\n" not in str(caught.value) and ".cc:" not in str(caught.value)


def test_a_compiler_needs_a_stop_token_inside_the_vocabulary() -> None:
    tokenizer = _tiny_bpe_tokenizer()
    with pytest.raises(ValueError, match=r"stop_token_ids \[9999\] outside the vocabulary of 464"):
        ConstraintCompiler(tokenizer, vocab_size=464, stop_token_ids=[9999])


def test_a_tokenizer_xgrammar_cannot_read_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^ConstraintCompiler: xgrammar cannot read the tokenizer object .*fast tokenizer$"):
        ConstraintCompiler(object(), vocab_size=10, stop_token_ids=[1])
