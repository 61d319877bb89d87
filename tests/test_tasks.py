"""Tasks are components: the built-ins come through the registry like a third-party task,
a task written in a test trains and hosts, and manifests written before tasks were plugins
still load."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

import plugtune
from plugtune import hookimpl
from plugtune.artifacts.adapters import MANIFEST_FILE
from plugtune.data.labels import IGNORE_INDEX, LabelPositions, eval_batch_from_label_logits
from plugtune.data.tasks import build_task, collate, raw_prompt_task
from plugtune.kernel.components import ComponentOptions, EvalBatch, Task
from plugtune.kernel.errors import PluginError, RecipeError
from plugtune.kernel.registry import build_plugin_system, set_plugin_system
from plugtune.serving.host import AdapterHost


class QaPairsOptions(ComponentOptions):
    question: str = "question"  # column names, not templates: a shape no built-in task has
    answer: str = "answer"


class QaPairs:
    """A third-party task: ``Q: <question> A:`` then `` <answer>`` + EOS, loss on the answer.
    Implements the protocol without inheriting from it."""

    Options = QaPairsOptions
    head: ClassVar[str] = "lm"
    generates: ClassVar[bool] = True

    def __init__(self, options: QaPairsOptions, name: str) -> None:
        self.type = name
        self.question, self.answer = options.question, options.answer
        self.labels = None

    @property
    def is_classification(self) -> bool:
        return False

    @classmethod
    def for_raw_prompts(cls, name: str) -> QaPairs:
        return cls(QaPairsOptions(), name)

    def required_fields(self) -> set[str]:
        return {self.question, self.answer}

    def setup(self, train: list[dict[str, Any]]) -> None:
        pass

    def format_prompt(self, text: str) -> str | None:
        return f"Q: {text} A:"

    def encode_prompt(self, example: dict[str, Any], tokenizer: Any) -> list[int]:
        return tokenizer(self.format_prompt(str(example[self.question])))["input_ids"]

    def reference_text(self, example: dict[str, Any]) -> str | None:
        return str(example[self.answer])

    def encode(self, example: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        prompt = self.encode_prompt(example, tokenizer)
        answer = tokenizer(f" {example[self.answer]}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": (prompt + answer)[:max_length],
                "labels": ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]}

    def collate(self, rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(rows, pad_id, classification=False)

    def eval_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalBatch:
        labels = batch["labels"]  # (B, T)
        positions = LabelPositions.of(labels)
        logits = logits[:, logits.size(1) - labels.size(1):]  # (B, T, V) past any virtual tokens
        return eval_batch_from_label_logits(logits[positions.rows, positions.columns], positions)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "question": self.question, "answer": self.answer, "labels": None}


class QaPairsPlugin:
    @hookimpl
    def register_tasks(self, register):
        register("qa-pairs", QaPairs)


@pytest.fixture
def with_qa_pairs():
    system = build_plugin_system(extra_plugins=[("qa_pairs", QaPairsPlugin())])
    set_plugin_system(system)
    try:
        yield system
    finally:
        set_plugin_system(None)


def test_built_in_tasks_are_registered_plugins(plugin_system) -> None:
    tasks = plugin_system.components["task"]
    assert {"causal-lm", "sequence-classification"} <= set(tasks)
    for name in ("causal-lm", "sequence-classification"):
        assert tasks[name].plugin.builtin and tasks[name].obj.__module__.startswith("plugtune.plugins.tasks.")
    lm = build_task({"type": "causal-lm", "prompt": "{q}", "response": " {a}"})
    cls = build_task({"type": "sequence-classification", "text": "{text}"})
    assert isinstance(lm, Task) and isinstance(cls, Task)
    assert (lm.head, lm.is_classification, lm.generates) == ("lm", False, True)
    assert (cls.head, cls.is_classification, cls.generates) == ("classifier", True, False)
    cls.setup([{"text": "x", "label": 10}, {"text": "y", "label": 2}, {"text": "z", "label": 2}])
    assert cls.labels == ["2", "10"]  # numbers sort as numbers


def test_build_task_refuses_unknown_types_and_bad_options_in_one_line(plugin_system) -> None:
    with pytest.raises(PluginError) as err:
        build_task({"type": "dialogue", "prompt": "{q}"}, where="adapter a/b: task")
    assert str(err.value) == ("adapter a/b: task.type: unknown task 'dialogue' "
                              "(installed: causal-lm, chat, preference, reward, sequence-classification)")
    with pytest.raises(PluginError, match=r"^task\.labels: Input should be a valid list$"):
        build_task({"type": "sequence-classification", "labels": "a,b"})
    with pytest.raises(PluginError, match=r"^task\.type: unknown task 'None'"):
        build_task({"prompt": "{q}"})


def test_a_third_party_task_trains_is_recorded_and_hosts(with_qa_pairs, make_recipe, tmp_path) -> None:
    path = make_recipe(task={"type": "qa-pairs", "question": "question", "answer": "answer"},
                       evaluators=["loss", "accuracy"], training={"max_steps": 4, "batch_size": 8,
                                                                  "learning_rate": 2e-2, "max_length": 48,
                                                                  "device": "cpu", "eval_before": True})
    recipe = plugtune.load_recipe(path)
    assert isinstance(recipe.task, QaPairs)
    result = plugtune.run(recipe, show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    manifest = json.loads((result.adapter_dir / MANIFEST_FILE).read_text())
    assert manifest["task"] == {"type": "qa-pairs", "question": "question", "answer": "answer", "labels": None}

    host = AdapterHost.from_adapters(result.adapter_dir)
    assert isinstance(host.task, QaPairs)
    assert host.format_prompt("what is the colour of the sky ?") == "Q: what is the colour of the sky ? A:"
    assert len(host.generate(["what is the colour of the sky ?"], max_new_tokens=2)) == 1

    # Without the plugin, the adapter says which task it needs, in one line.
    set_plugin_system(build_plugin_system())
    with pytest.raises(PluginError, match=r"task\.type: unknown task 'qa-pairs' \(installed: causal-lm, "):
        AdapterHost.from_adapters(result.adapter_dir)


def test_a_third_party_tasks_columns_are_checked_at_validation(with_qa_pairs, make_recipe) -> None:
    path = make_recipe(task={"type": "qa-pairs", "question": "questoin"})
    with pytest.raises(RecipeError) as err:
        plugtune.load_recipe(path)
    assert err.value.problems == ["task.question: column 'questoin' is not in the data; did you mean 'question'? "
                                  "(columns: question, answer); rename it with data.options.columns"]


def test_raw_prompts_come_from_the_task_that_declares_it(monkeypatch) -> None:
    assert raw_prompt_task(build_plugin_system()).format_prompt("hello") == "hello"
    monkeypatch.setenv("PLUGTUNE_DISABLE_PLUGINS", "causal_lm")
    assert isinstance(raw_prompt_task(build_plugin_system(extra_plugins=[("qa", QaPairsPlugin())])), QaPairs)
    with pytest.raises(PluginError, match="no installed task serves raw text prompts"):
        raw_prompt_task(build_plugin_system())


def test_an_adapter_saved_by_the_old_code_loads_and_gives_the_same_logits(make_recipe, tmp_path) -> None:
    """Before tasks were plugins, every manifest recorded all seven fields of the one Task
    dataclass, whatever the type; such a manifest builds the same task and the same logits."""
    recipe = plugtune.load_recipe(make_recipe(classification=True, training={
        "max_steps": 2, "batch_size": 8, "device": "cpu", "eval_before": False, "max_length": 48}))
    result = plugtune.run(recipe, show_progress=False)
    texts = ["the film was great lovely fun", "the plot was awful dull weak"]
    new = AdapterHost.from_adapters(result.adapter_dir).logits(texts)

    manifest_path = result.adapter_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    labels = manifest["task"]["labels"]
    assert labels == ["negative", "positive"]
    manifest["task"] = {"type": "sequence-classification", "prompt": None, "response": None, "text": "{text}",
                        "label": "label", "labels": labels, "label_words": None}  # the old shape
    manifest_path.write_text(json.dumps(manifest))
    host = AdapterHost.from_adapters(result.adapter_dir)
    assert host.task.labels == labels and host.task.to_dict()["type"] == "sequence-classification"
    torch.testing.assert_close(host.logits(texts), new, atol=0, rtol=0)
    assert {r["label"] for r in host.classify(texts)} <= set(labels)
