"""The adapter host on the tiny Llama: switching without touching weights, mixed-adapter
batches equal to each adapter alone, the KV-cached stream, merge/unmerge, unload giving the
base back, list(), and combining LoRA adapters."""

from __future__ import annotations

import json

import pytest
import torch

import plugtune
from plugtune.artifacts.adapters import MANIFEST_FILE, WEIGHTS_FILE, read_adapter, save_adapter
from plugtune.cli import main
from plugtune.artifacts.combine import combine_adapters
from plugtune.kernel.errors import AdapterError
from plugtune.serving.host import AdapterHost
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.data.tasks import build_task

TASK = build_task(dict(type="causal-lm", prompt="question : {q} answer :", response=" {a}"))
TEXTS = ["question : what is the colour of the sky ? answer : blue", "the film was great",
         "what is the capital of the sea", "a very fun story"]
PROMPTS = ["what is the colour of the sky ?", "what is the colour of the grass ?",
           "what is the colour of the sun ?", "what is the colour of the sea ?"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_llama):
    """Three random LoRA adapters on the tiny Llama: ranks 4, 2 and 4 (the third on every
    projection), large enough to change the output."""
    root = tmp_path_factory.mktemp("loras")
    base = AdapterHost.from_base(str(tiny_llama), TASK).base
    return [
        random_lora_adapter(root / "a", base, TASK, r=4, seed=1, scale=0.5),
        random_lora_adapter(root / "b", base, TASK, r=2, seed=2, scale=0.5),
        random_lora_adapter(root / "c", base, TASK, r=4, seed=3, scale=0.5, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, tiny_data):
    """A full-delta and a prefix adapter trained briefly on the tiny Llama."""
    import yaml

    from plugtune.testing import recipe_dict

    root = tmp_path_factory.mktemp("trained")
    dirs = {}
    for name, method in (("full", {"name": "full", "options": {}}),
                         ("prefix", {"name": "prefix", "options": {"num_virtual_tokens": 4}})):
        recipe = recipe_dict(tiny_llama, tiny_data, name=name, method=method, output={"dir": str(root / name)})
        recipe["training"]["learning_rate"] = 1e-2 if name == "full" else 5e-2
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        dirs[name] = plugtune.run(path, show_progress=False).adapter_dir
    return dirs


def _host(tiny_llama, *dirs) -> AdapterHost:
    host = AdapterHost.from_base(str(tiny_llama), TASK)
    for d in dirs:
        host.load(d)
    return host


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- switching and loading -----------------------------------------------------------------


def test_switch_between_lora_adapters_touches_no_tensor(loras, tiny_llama):
    host = _host(tiny_llama, *loras)
    expected = {n: host.logits(TEXTS, n) for n in (None, "a", "b", "c")}
    assert min((expected[n] - expected[None]).abs().max() for n in "abc") > 1e-3
    before = _tensors(host.base.model)
    for name in ["b", None, "a", "c", "a", None, "b"]:
        host.use(name)
        assert host.active == name
        torch.testing.assert_close(host.logits(TEXTS), expected[name], atol=1e-6, rtol=0)
    after = host.base.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_logits_match_plain_peft(loras, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    host = _host(tiny_llama, *loras)
    enc = host.tokenizer(TEXTS, return_tensors="pt", padding=True)
    for d in loras:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), d).eval()
        with torch.no_grad():
            torch.testing.assert_close(host.logits(TEXTS, d.name), model(**enc).logits, atol=1e-5, rtol=0)


def test_unload_gives_the_plain_base_back(loras, tiny_llama):
    host = AdapterHost.from_base(str(tiny_llama), TASK)
    q_proj = type(host.base.model.model.layers[0].self_attn.q_proj)
    before = _tensors(host.base.model)
    for d in loras:
        host.load(d)
    assert type(host.base.model.model.layers[0].self_attn.q_proj) is not q_proj  # hosted layers
    for name in ("b", "a", "c"):
        host.unload(name)
    assert type(host.base.model.model.layers[0].self_attn.q_proj) is q_proj
    after = host.base.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    handler = next(iter(host.handlers.values()))
    assert handler._host_state.layers == {} and handler._host_state.resident == {}


def test_unloading_one_of_several_adapters_frees_its_tensors(loras, tiny_llama):
    """The memory comes back: after unload (and a mixed batch that stacked every adapter's
    weights), nothing keeps the unloaded adapter's tensors alive."""
    import gc
    import weakref

    host = _host(tiny_llama, *loras)
    host.logits(TEXTS, ["a", "b", "c", None])  # builds the stacked weights of the mixed path
    handler = next(iter(host.handlers.values()))
    layers = [layer for layer in handler._host_state.layers.values() if "a" in layer.weights]
    refs = [weakref.ref(t) for layer in layers for t in (layer.weights["a"].A, layer.weights["a"].B)]
    # the mixed path's stacked copies hold "a"'s weights too
    refs += [weakref.ref(t) for layer in layers for t in (*layer._stack[1:], *layer._per_row[1:])]
    assert refs
    host.unload("a")
    host.logits(TEXTS, "b")  # a single-adapter batch: nothing restacks, so only unload can free them
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert sorted(host.adapters) == ["b", "c"]


def test_list_reports_each_adapter(loras, tiny_llama):
    host = _host(tiny_llama, *loras[:2])
    host.use("b")
    records = host.list()
    fingerprint = host.base.info.fingerprint
    assert [(r["name"], r["method"], r["task"], r["base_fingerprint"], r["active"]) for r in records] == [
        ("a", "lora", "causal-lm", fingerprint, False), ("b", "lora", "causal-lm", fingerprint, True)]
    assert records[0]["size_bytes"] == (loras[0] / WEIGHTS_FILE).stat().st_size
    assert records[0]["resident_bytes"] == sum(t.nbytes for t in read_adapter(loras[0]).state.values())


# -- mixed batches ---------------------------------------------------------------------------


def test_mixed_lora_batch_equals_each_adapter_alone(loras, tiny_llama):
    host = _host(tiny_llama, *loras)
    rows = ["a", None, "b", "c"]
    mixed = host.logits(TEXTS, rows)
    for i, name in enumerate(rows):
        alone = host.logits(TEXTS, name)[i]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)


def test_mixed_batch_across_methods(loras, trained, tiny_llama):
    host = _host(tiny_llama, loras[0], loras[1], trained["full"], trained["prefix"])
    rows = ["full", "a", "prefix", None, "b", "full", "a", "prefix"]
    texts = (TEXTS * 2)[: len(rows)]
    mixed = host.logits(texts, rows)
    for i, name in enumerate(rows):
        alone = host.logits([texts[i]], name)[0]  # no padding: compare the text's own positions
        torch.testing.assert_close(mixed[i, : len(alone)], alone, atol=1e-5, rtol=0)
    prompts = (PROMPTS * 2)[: len(rows)]
    together = host.generate(prompts, rows, max_new_tokens=5)
    assert together == [host.generate([p], n, max_new_tokens=5)[0] for p, n in zip(prompts, rows)]


# -- the stream --------------------------------------------------------------------------------


def test_greedy_decode_matches_transformers_generate(loras, tiny_llama):
    from transformers import AutoModelForCausalLM

    host = _host(tiny_llama, loras[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    host.tokenizer.padding_side = "left"
    enc = host.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    host.tokenizer.padding_side = "right"
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=host.tokenizer.pad_token_id)
    expected = [t.strip() for t in host.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert host.generate(PROMPTS[:2], None, raw=True, max_new_tokens=6) == expected

    # with an adapter, against plain peft's generate on the same adapter folder
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, loras[0]).eval()
    out = peft_model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=host.tokenizer.pad_token_id)
    expected = [t.strip() for t in host.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert host.generate(PROMPTS[:2], "a", raw=True, max_new_tokens=6) == expected


def test_stream_joins_to_generate_and_reports_finish(loras, tiny_llama):
    host = _host(tiny_llama, *loras)
    rows = ["a", "b", None, "c"]
    stream = host.stream(PROMPTS, rows, max_new_tokens=6)
    steps = list(stream)
    assert 1 <= len(steps) <= 6 and all(len(step) == 4 for step in steps)
    joined = ["".join(step[i] for step in steps) for i in range(4)]
    assert [j.strip() for j in joined] == host.generate(PROMPTS, rows, max_new_tokens=6)
    assert joined == stream.texts
    assert all(reason in {"stop", "length"} for reason in stream.finish_reasons)
    for i in range(4):
        assert (stream.finish_reasons[i] == "length") == (stream.completion_tokens[i] == 6)
    assert stream.prompt_tokens == [len(host.tokenizer(host.format_prompt(p, "a"))["input_ids"]) for p in PROMPTS]


def test_stream_stop_string_cuts_the_text(loras, tiny_llama):
    host = _host(tiny_llama, loras[0])
    full = host.stream([PROMPTS[0]], "a", max_new_tokens=8, ignore_eos=True)
    text = "".join(step[0] for step in full)
    words = text.split()
    assert len(words) >= 3
    stop = words[2]
    cut = host.stream([PROMPTS[0]], "a", max_new_tokens=8, ignore_eos=True, stop=[stop])
    got = "".join(step[0] for step in cut)
    assert got == text[: text.find(stop)] and cut.finish_reasons == ["stop"]
    assert full.finish_reasons == ["length"] and full.completion_tokens == [8]


def test_sampling_is_per_row_and_repeatable(loras, tiny_llama):
    host = _host(tiny_llama, *loras)
    prompts, rows = PROMPTS * 2, ["a", "b", "c", None] * 2
    kwargs = {"max_new_tokens": 6, "temperature": [0.0] * 4 + [1.5] * 4, "top_p": 0.95, "ignore_eos": True}
    first = host.generate(prompts, rows, seed=7, **kwargs)
    assert host.generate(prompts, rows, seed=7, **kwargs) == first
    greedy = host.generate(prompts[:4], rows[:4], max_new_tokens=6, ignore_eos=True)
    assert first[:4] == greedy
    others = [host.generate(prompts, rows, seed=s, **kwargs)[4:] for s in (8, 9, 10)]
    assert any(o != first[4:] for o in others)


# -- merging ---------------------------------------------------------------------------------


def test_merge_and_unmerge_exactly(loras, trained, tiny_llama):
    host = _host(tiny_llama, *loras, trained["full"])
    before = _tensors(host.base.model)
    for name in ("c", "full"):
        unmerged = host.logits(TEXTS, name)
        generated = host.generate(PROMPTS, name, max_new_tokens=4)
        host.merge(name)
        assert host.active == name and host.merged == name
        torch.testing.assert_close(host.logits(TEXTS), unmerged, atol=1e-5, rtol=0)
        assert host.generate(PROMPTS, name, max_new_tokens=4) == generated
        with pytest.raises(AdapterError) as err:
            host.use("a")
        assert str(err.value) == f"adapter {name!r} is merged into the base; call unmerge() before using 'a'"
        with pytest.raises(AdapterError) as err:
            host.load(trained["prefix"])  # its attach must see the bare base
        assert str(err.value) == f"adapter {name!r} is merged into the base; call unmerge() before loading 'prefix'"
        host.unmerge()
        host.use(None)
        after = host.base.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        torch.testing.assert_close(host.logits(TEXTS, name), unmerged, atol=1e-6, rtol=0)


def test_prefix_adapters_cannot_be_merged(trained, tiny_llama):
    host = _host(tiny_llama, trained["prefix"])
    with pytest.raises(AdapterError) as err:
        host.merge("prefix")
    assert str(err.value) == "adapter 'prefix': prefix adapters cannot be merged into the base weights"


# -- combining ---------------------------------------------------------------------------------


def test_linear_combination_with_weights_one_zero_is_the_first_parent(loras, tiny_llama, tmp_path):
    a, b = loras[0], random_lora_adapter(tmp_path / "b4", AdapterHost.from_base(str(tiny_llama), TASK).base, TASK, r=4, seed=5, scale=0.5)
    out = combine_adapters(tmp_path / "blend", [a, b], [1.0, 0.0], method="linear")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["combination"]["method"] == "linear" and manifest["combination"]["weights"] == [1.0, 0.0]
    assert [(p["name"], p["weight"], p["sha256"]) for p in manifest["parents"]] == [
        ("a", 1.0, read_adapter(a).manifest.files[WEIGHTS_FILE]["sha256"]),
        ("b4", 0.0, read_adapter(b).manifest.files[WEIGHTS_FILE]["sha256"])]
    host = _host(tiny_llama, a, out)
    torch.testing.assert_close(host.logits(TEXTS, "blend"), host.logits(TEXTS, "a"), atol=1e-5, rtol=0)


def test_ties_combination_through_the_cli_loads(loras, tiny_llama, tmp_path, capsys):
    out = tmp_path / "ties"
    code = main(["combine", str(out), str(loras[0]), str(loras[2]), "--weights", "0.6", "0.4",
                 "--method", "ties", "--density", "0.5"])
    assert code == 0, capsys.readouterr().err
    manifest = read_adapter(out).manifest
    assert manifest.model_extra["combination"]["density"] == 0.5
    host = _host(tiny_llama, out)
    blended = host.logits(TEXTS, "ties")
    assert (blended - host.logits(TEXTS, None)).abs().max() > 1e-4
    assert main(["combine", str(tmp_path / "x"), str(loras[0]), str(loras[1]), "--method", "ties"]) == 5
    assert capsys.readouterr().err.strip() == (
        "error: combination method 'ties' needs a density (the fraction of each update kept), e.g. --density 0.5")


def test_cli_merge_writes_a_plain_model_with_the_adapter_folded_in(loras, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(loras[2]), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    host = _host(tiny_llama, loras[2])
    enc = host.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, host.logits(TEXTS, "c"), atol=1e-5, rtol=0)


def test_rows_that_finish_early_leave_the_others_unchanged(loras, tiny_llama):
    host = _host(tiny_llama, *loras)
    rows = ["a", "b", None, "c"]
    alone = [host.generate([p], n, max_new_tokens=8, ignore_eos=True)[0] for p, n in zip(PROMPTS, rows)]
    stop = alone[0].split()[1]  # row 0 stops after its first word; the others run on
    stream = host.stream(PROMPTS, rows, max_new_tokens=8, ignore_eos=True, stop=[stop])
    steps = list(stream)
    assert stream.finish_reasons[0] == "stop" and len(steps) == 8
    assert [t.strip() for t in stream.texts[1:]] == [a[: a.find(stop)].strip() if stop in a else a for a in alone[1:]]
    assert stream.texts[0].strip() == alone[0][: alone[0].find(stop)].strip()


def test_mixed_classification_batch_with_lora_heads(make_recipe, tmp_path):
    result = plugtune.run(make_recipe(classification=True), show_progress=False)
    original = read_adapter(result.adapter_dir)
    flipped = {k: (-v if k.endswith("classifier.weight") else v) for k, v in original.state.items()}
    assert any(k.endswith("classifier.weight") for k in original.state)  # the head travels with the adapter
    record = original.manifest.model_dump()
    record.pop("files")
    record["name"] = "flipped"
    other = save_adapter(tmp_path / "flipped", state=flipped, config=original.config, manifest=record)
    host = AdapterHost.from_adapters(result.adapter_dir, other)
    texts = ["the film was great wonderful", "the film was great wonderful", "a very fun story", "the acting was flat"]
    rows = ["tiny", "flipped", None, "tiny"]
    mixed = host.classify(texts, rows)
    alone = [host.classify([t], n)[0] for t, n in zip(texts, rows)]
    for got, want in zip(mixed, alone):
        assert got["label"] == want["label"]
        assert all(abs(got["scores"][k] - want["scores"][k]) < 1e-5 for k in want["scores"])
    assert mixed[0]["scores"] != mixed[1]["scores"]  # same text, the other adapter's head


def test_an_empty_prompt_decodes_from_one_start_token(loras, tiny_llama):
    host = _host(tiny_llama, loras[0])
    stream = host.stream(["", PROMPTS[0]], ["a", None], raw=True, max_new_tokens=3, ignore_eos=True)
    list(stream)
    assert stream.prompt_tokens[0] == 1 and stream.completion_tokens == [3, 3]
    assert stream.texts[1].strip() == host.generate([PROMPTS[0]], None, raw=True, max_new_tokens=3, ignore_eos=True)[0]


# -- per-row stops and budgets, cancelling -----------------------------------------------------


def _alone(host: AdapterHost, prompt: str, adapter: str | None, **options) -> tuple[str, str, int]:
    """What the stream gives this one row decoded by itself: text, finish reason, tokens."""
    stream = host.stream([prompt], [adapter], ignore_eos=True, **options)
    for _ in stream:
        pass
    return stream.texts[0], stream.finish_reasons[0], stream.completion_tokens[0]


@pytest.fixture
def batch_sizes(tiny_llama):
    """The batch size of every forward through a model: a pre-hook on it records
    ``input_ids.shape[0]``; call the fixture with the model, read the list it returns."""
    handles, sizes = [], []

    def watch(model: torch.nn.Module) -> list[int]:
        handles.append(model.register_forward_pre_hook(
            lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True))
        return sizes

    yield watch
    for handle in handles:
        handle.remove()


def test_per_row_stops_and_budgets_equal_each_row_alone(loras, tiny_llama, batch_sizes):
    """One stream, each row with its own stop strings and token budget: every row gets what
    it gets decoded by itself with those settings, and leaves the batch in the step it is
    cut (so step k runs only the rows that have not finished before it)."""
    host = _host(tiny_llama, *loras)
    rows = ["a", "b", None, "c"]
    full = [_alone(host, p, n, max_new_tokens=10)[0] for p, n in zip(PROMPTS, rows)]
    stops = [[full[0].split()[1]], [], ["never", full[2].split()[2]], ["never"]]
    budgets = [10, 3, 10, 6]
    expected = [_alone(host, p, n, max_new_tokens=k, stop=s) for p, n, k, s in zip(PROMPTS, rows, budgets, stops)]
    assert [e[1] for e in expected] == ["stop", "length", "stop", "length"]  # each cut its own way, early

    sizes = batch_sizes(host.base.model)
    stream = host.stream(PROMPTS, rows, max_new_tokens=budgets, stop=stops, ignore_eos=True)
    steps = list(stream)
    assert list(zip(stream.texts, stream.finish_reasons, stream.completion_tokens)) == expected
    assert ["".join(step[i] for step in steps) for i in range(4)] == stream.texts
    tokens = stream.completion_tokens  # without end tokens, a row's count is the step it finished in
    assert len(steps) == max(tokens) < 10
    assert sizes == [sum(t >= step for t in tokens) for step in range(1, len(steps) + 1)]

    with pytest.raises(AdapterError, match="4 prompts but 3 max_new_tokens values"):
        host.stream(PROMPTS, rows, max_new_tokens=[1, 2, 3])
    with pytest.raises(AdapterError, match="one list per prompt"):
        host.stream(PROMPTS, rows, stop=[["x"], ["y"]])


def test_one_stop_list_and_one_budget_still_apply_to_every_row(loras, tiny_llama):
    host = _host(tiny_llama, *loras)
    rows = ["a", "b", None, "c"]
    stop = _alone(host, PROMPTS[0], "a", max_new_tokens=8)[0].split()[1]
    shared = host.stream(PROMPTS, rows, max_new_tokens=8, stop=[stop], ignore_eos=True)
    list(shared)
    per_row = host.stream(PROMPTS, rows, max_new_tokens=[8] * 4, stop=[[stop]] * 4, ignore_eos=True)
    list(per_row)
    assert (shared.texts, shared.finish_reasons) == (per_row.texts, per_row.finish_reasons)
    assert shared.finish_reasons[0] == "stop"
    single = host.stream(PROMPTS[:2], rows[:2], max_new_tokens=8, stop=stop, ignore_eos=True)  # one string
    list(single)
    assert single.texts == shared.texts[:2]
    nothing = host.stream(PROMPTS[:2], rows[:2], max_new_tokens=[0, 2], ignore_eos=True)
    assert nothing.finish_reasons == ["length", None]
    list(nothing)
    assert nothing.texts[0] == "" and nothing.completion_tokens == [0, 2]


def test_cancel_takes_a_row_out_and_leaves_the_others_unchanged(loras, trained, tiny_llama, batch_sizes):
    """``cancel(i)`` mid-stream: the row keeps its text so far, finishes as "cancelled" and
    runs in no later forward; the other rows decode exactly as they would have. A row
    cancelled before the first step (here one of two prefix rows) never runs at all."""
    host = _host(tiny_llama, loras[0], loras[1], trained["prefix"])
    rows = ["a", "prefix", None, "b", "prefix"]
    prompts = PROMPTS + PROMPTS[:1]
    expected = host.stream(prompts, rows, max_new_tokens=6, ignore_eos=True)
    list(expected)

    sizes = batch_sizes(host.base.model)  # prefix rows decode through the bare base too
    stream = host.stream(prompts, rows, max_new_tokens=6, ignore_eos=True)
    stream.cancel(4)
    steps = [next(stream), next(stream)]
    text_at_cancel = stream.texts[2]
    stream.cancel(2)
    stream.cancel(2)  # a second cancel changes nothing
    steps += list(stream)
    assert len(steps) == 6 and all(step[2] == "" for step in steps[2:]) and all(step[4] == "" for step in steps)
    assert stream.texts[2] == text_at_cancel == expected.texts[2][: len(text_at_cancel)]
    assert stream.finish_reasons == ["length", "length", "cancelled", "length", "cancelled"]
    assert stream.completion_tokens == [6, 6, 2, 6, 0]
    for i in (0, 1, 3):
        assert stream.texts[i] == expected.texts[i]
    # per step, the LoRA/bare-base group's forward, then the prefix group's (one row: 4 never ran);
    # row 2 was in the first two steps only
    assert sizes == [3, 1] * 2 + [2, 1] * 4
