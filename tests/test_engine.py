"""The continuous-batching decode engine on the tiny Llama: rows that join a running batch,
prompts prefilled in chunks under a token budget, rows that leave, each answer equal to the
row decoded alone (LoRA rows mixed with bare-base rows, prefix adapters in their own group),
seeded rows that repeat whatever else runs, logprobs equal to a plain forward's, and a
failure kept to its row."""

from __future__ import annotations

import pytest
import torch

import plugtune
from plugtune.data.tasks import build_task
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.serving.engine import DecodeEngine, RowSpec, SlabLayer
from plugtune.serving.host import AdapterHost

TASK = build_task(dict(type="causal-lm", prompt="question : {q} answer :", response=" {a}"))
PROMPTS = ["question : what is the colour of the sky ? answer :", "the film was",
           "question : what is the colour of the sea and of the grass and of the sun in the morning ? answer :",
           "a very"]


@pytest.fixture(scope="module")
def host(tmp_path_factory, tiny_llama, tiny_data):
    import yaml
    from plugtune.testing import recipe_dict

    root = tmp_path_factory.mktemp("engine")
    host = AdapterHost.from_base(str(tiny_llama), TASK)
    for name, seed in (("a", 1), ("b", 2)):
        host.load(random_lora_adapter(root / name, host.base, TASK, r=4, seed=seed, scale=0.5))
    recipe = recipe_dict(tiny_llama, tiny_data, name="prefix", method={"name": "prefix", "options": {"num_virtual_tokens": 4}},
                         output={"dir": str(root / "prefix")})
    recipe["training"]["learning_rate"] = 5e-2
    (root / "prefix.yaml").write_text(yaml.safe_dump(recipe))
    host.load(plugtune.run(root / "prefix.yaml", show_progress=False).adapter_dir, name="p")
    return host


def ids(host, text):
    return host.tokenizer(text)["input_ids"]


def alone(host, prompt, adapter, n=8, **kw):
    engine = host.decode_engine(max_rows=1)
    row = engine.add(RowSpec(ids(host, prompt), adapter, n, ignore_eos=True, **kw))
    while not engine.idle:
        engine.step()
    return row


def run(engine, steps=1000):
    for _ in range(steps):
        if engine.idle:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def test_rows_joining_a_running_batch_answer_as_alone(host):
    """Rows added while others decode (LoRA, bare base and prefix rows in one engine) give
    token for token what each gives alone."""
    cases = [(PROMPTS[0], "a"), (PROMPTS[1], None), (PROMPTS[2], "b"), (PROMPTS[3], "p"), (PROMPTS[0], None),
             (PROMPTS[2], "p")]
    expected = [alone(host, p, n).generated for p, n in cases]
    engine = host.decode_engine(max_rows=8, chunk_tokens=4, step_tokens=12)
    rows = []
    for p, n in cases:  # one joins every second step
        rows.append(engine.add(RowSpec(ids(host, p), n, 8, ignore_eos=True)))
        engine.step()
        engine.step()
    run(engine)
    assert [r.generated for r in rows] == expected
    assert all(r.finish_reason == "length" for r in rows)


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode(host):
    engine = host.decode_engine(max_rows=4, chunk_tokens=3, step_tokens=4)
    running = engine.add(RowSpec(ids(host, PROMPTS[1]), "a", 30, ignore_eos=True))
    engine.step()  # its prompt (3 tokens) fits one chunk: its first token
    assert running.completion_tokens == 1
    long = engine.add(RowSpec(ids(host, PROMPTS[2]), "b", 4, ignore_eos=True))
    prompt_steps = 0
    while not long.generated:
        before = running.completion_tokens
        engine.step()
        assert engine.last_step_tokens <= 4  # the step's budget: 1 decode token + one chunk of 3
        assert running.completion_tokens == before + 1  # the running row never waits for the prefill
        prompt_steps += 1
    assert prompt_steps == -(-len(ids(host, PROMPTS[2])) // 3)
    run(engine)
    assert long.generated == alone(host, PROMPTS[2], "b", 4).generated
    assert running.generated == alone(host, PROMPTS[1], "a", 30).generated


def test_max_rows_bounds_the_batch_and_waiting_rows_join_when_one_leaves(host):
    engine = host.decode_engine(max_rows=2)
    rows = [engine.add(RowSpec(ids(host, p), None, k, ignore_eos=True)) for p, k in zip(PROMPTS, (2, 6, 6, 6))]
    engine.step()
    assert engine.running == 2 and len(engine.waiting) == 2
    engine.step()  # row 0 has its 2 tokens: it leaves, row 2 joins at the next step
    engine.step()
    assert rows[0].finish_reason == "length" and engine.running == 2 and len(engine.waiting) == 1
    run(engine)
    assert engine.largest == 2
    assert [r.generated for r in rows] == [alone(host, p, None, k).generated for p, k in zip(PROMPTS, (2, 6, 6, 6))]


def test_a_seeded_row_repeats_whatever_else_runs(host):
    sampled = dict(temperature=1.3, top_p=0.95, seed=11)
    first = alone(host, PROMPTS[0], "a", 10, **sampled).generated
    engine = host.decode_engine(max_rows=8)
    others = [engine.add(RowSpec(ids(host, p), n, 10, temperature=1.0, ignore_eos=True)) for p, n in zip(PROMPTS, ["b", None, "a", "p"])]
    engine.step()
    row = engine.add(RowSpec(ids(host, PROMPTS[0]), "a", 10, ignore_eos=True, **sampled))
    run(engine)
    assert row.generated == first and all(o.finish_reason == "length" for o in others)
    assert alone(host, PROMPTS[0], "a", 10, **{**sampled, "seed": 12}).generated != first


def test_logprobs_equal_a_plain_forward(host):
    row = alone(host, PROMPTS[0], "a", 5, logprobs=3, prompt_logprobs=True)
    prompt = ids(host, PROMPTS[0])
    sequence = torch.tensor([prompt + row.generated])
    with torch.no_grad(), host.using("a"):
        logp = host.model(input_ids=sequence).logits.float().log_softmax(-1)[0]
    for t, info in enumerate(row.tokens):  # generated token t is predicted at position len(prompt) - 1 + t
        dist = logp[len(prompt) - 1 + t]
        assert info.token == row.generated[t] == int(dist.argmax())
        assert info.logprob == pytest.approx(float(dist[info.token]), abs=1e-4)
        assert [i for i, _ in info.top] == dist.topk(3).indices.tolist()
    assert [i.token for i in row.prompt_info] == prompt[1:]
    for t, info in enumerate(row.prompt_info):
        assert info.logprob == pytest.approx(float(logp[t, prompt[t + 1]]), abs=1e-4)


def test_prompt_logprobs_survive_chunking_and_left_padding(host):
    whole = alone(host, PROMPTS[2], "b", 1, logprobs=2, prompt_logprobs=True).prompt_info
    engine = host.decode_engine(max_rows=4, chunk_tokens=5)
    short = engine.add(RowSpec(ids(host, PROMPTS[1]), None, 1, ignore_eos=True))
    row = engine.add(RowSpec(ids(host, PROMPTS[2]), "b", 0, logprobs=2, prompt_logprobs=True))  # scored only
    run(engine)
    assert row.generated == [] and row.finish_reason == "length" and short.finish_reason == "length"
    assert [i.token for i in row.prompt_info] == [i.token for i in whole]
    assert [i.logprob for i in row.prompt_info] == pytest.approx([i.logprob for i in whole], abs=1e-4)


class _Refuses:
    """A constraint whose accept() fails: only its row may end with the error."""

    finished = False

    def accept(self, token):
        raise RuntimeError("boom")


def test_a_failing_row_ends_alone(host):
    engine = host.decode_engine(max_rows=4, mask_fn=lambda logits, constraints: None)
    good = engine.add(RowSpec(ids(host, PROMPTS[0]), "a", 6, ignore_eos=True))
    bad = engine.add(RowSpec(ids(host, PROMPTS[1]), "a", 6, ignore_eos=True, constraint=_Refuses()))
    run(engine)
    assert bad.finish_reason == "error" and str(bad.error) == "boom"
    assert good.generated == alone(host, PROMPTS[0], "a", 6).generated


def test_cancelled_rows_leave_and_the_cache_drops_unused_padding(host):
    engine = host.decode_engine(max_rows=4)
    long = engine.add(RowSpec(ids(host, PROMPTS[2]), None, 20, ignore_eos=True))
    short = engine.add(RowSpec(ids(host, PROMPTS[1]), None, 20, ignore_eos=True))
    engine.step()
    engine.step()
    seg = engine.segments[0]
    width = seg.cached
    engine.cancel(long)
    engine.step()
    assert long.finish_reason == "cancelled" and engine.running == 1
    assert engine.segments[0].cached < width  # the long prompt's columns went with it
    run(engine)
    assert short.generated == alone(host, PROMPTS[1], None, 20).generated


def test_slab_layer_grows_in_place_and_keeps_values():
    layer = SlabLayer()
    chunks = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 30, 1)]
    for c in chunks:
        keys, values = layer.update(c, c * 2)
    want = torch.cat(chunks, dim=2)
    assert torch.equal(keys, want) and torch.equal(values, want * 2) and layer.get_seq_length() == 38
    layer.batch_select_indices(torch.tensor([1]))
    layer.drop_front(5)
    assert torch.equal(layer.keys, want[1:, :, 5:])


def test_rows_must_have_a_prompt(host):
    with pytest.raises(ValueError, match="at least one prompt token"):
        host.decode_engine().add(RowSpec([]))


def test_the_prefix_cache_feeds_only_what_a_prompt_adds_and_answers_as_alone(host):
    """Prompts sharing a 32-token start on one adapter: the second and later feed only their
    own tail (the cache holds whole 16-token blocks, never the last token), answers equal to
    decoding without the cache; another adapter or a reload never shares entries."""
    start = " ".join(["question : what is the colour of the sky ?"] * 4)
    prompts = [start + " answer :", start + " and the sea ? answer :", start + " answer :"]
    engine = host.decode_engine(max_rows=4, prefix_cache_bytes=2**24)
    rows = []
    for p, name in zip(prompts, ["a", "a", None]):
        rows.append(engine.add(RowSpec(ids(host, p), name, 6, ignore_eos=True)))
        run(engine)
    assert engine.prefix_hits == 32  # the second row reused the first's two blocks; the base row shares nothing
    assert [r.generated for r in rows] == [alone(host, p, n, 6).generated for p, n in zip(prompts, ["a", "a", None])]
    again = engine.add(RowSpec(ids(host, prompts[0]), "a", 6, ignore_eos=True))
    mixed = engine.add(RowSpec(ids(host, prompts[1]), "b", 6, ignore_eos=True))
    run(engine)
    assert engine.prefix_hits == 64 and again.generated == rows[0].generated
    assert mixed.generated == alone(host, prompts[1], "b", 6).generated
    assert host.prefix_key("a") != host.prefix_key("b") and host.prefix_key(None) == ("base", 0)
