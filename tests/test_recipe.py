"""Recipe validation, overrides, error reporting and the table loader.

Fast: nothing here loads a model (validation never does; the model-loading functions are
replaced by ones that fail, to prove it).
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import yaml

from plugtune.kernel.errors import DataError, RecipeError
from plugtune.kernel.registry import get_plugin_system
from plugtune.plugins.loaders.table import TableLoader, TableOptions
from plugtune.training.recipe import load_recipe, parse_overrides, read_recipe_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(REPO.glob("recipes/*.yaml"))
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must never resolve, fetch or load a base model."""
    import plugtune.artifacts.models as models

    def forbidden(*args, **kwargs):
        raise AssertionError("recipe validation tried to resolve or load a base model")

    monkeypatch.setattr(models, "resolve", forbidden)
    monkeypatch.setattr(models, "load_base", forbidden)
    monkeypatch.setattr(models, "gguf_to_hf", forbidden)
    monkeypatch.setattr(models.PackagedModel, "locate", forbidden)


def recipe_error(*args, **kwargs) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------
# The shipped recipes
# --------------------------------------------------------------------------------------------


def test_repo_has_recipes() -> None:
    assert QUICKSTART in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if raw["task"]["type"] == "chat" and get_plugin_system().find("task", "chat") is None:
        pytest.skip("needs the chat task (issue 14), not installed on this branch")
    # From another directory: data paths resolve against the recipe's folder, not the cwd.
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.name == raw["name"]
    assert recipe.source == path
    assert recipe.base_dir == path.parent
    method = raw["method"]
    assert recipe.method.name == (method["name"] if isinstance(method, dict) else method)
    if recipe.loader.name == "table":
        assert recipe.loader.options.path.is_file()


BENCH_RECIPES = sorted((REPO / "bench" / "recipes").glob("*.yaml"))
SHARED_DATA = REPO.parent / "shared" / "data"


def test_shipped_recipes_read_only_the_repos_own_data() -> None:
    """A fresh clone without ../shared must validate every shipped recipe: their data lives
    in recipes/data/ (the benchmark recipes that read ../shared sit in bench/recipes/)."""
    for path in RECIPES:
        assert "shared/" not in path.read_text(encoding="utf-8"), f"{path.name} reads ../shared; move it to bench/recipes/"


@pytest.mark.skipif(not (SHARED_DATA / "sst2" / "train.tsv").exists(),
                    reason="SST-2 data not found beside the checkout (../shared/data/sst2)")
@pytest.mark.parametrize("path", BENCH_RECIPES, ids=[p.name for p in BENCH_RECIPES])
def test_benchmark_recipe_validates(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.loader.options.path.is_file()


def test_quickstart_contents() -> None:
    recipe = load_recipe(QUICKSTART)
    assert recipe.spec.base_model == "smollm2-135m"
    assert recipe.task.type == "causal-lm"
    assert recipe.loader.options.path == REPO / "recipes" / "data" / "support_tickets.csv"
    assert recipe.method.options.r == 8 and recipe.method.options.alpha == 16
    assert [b.name for b in recipe.evaluators] == ["accuracy", "f1", "loss", "perplexity"]
    assert [b.name for b in recipe.regularizers] == ["weight_decay"]
    assert recipe.training.learning_rate == pytest.approx(1e-3)
    assert recipe.output_dir == Path("adapters/quickstart")


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_override_training_value() -> None:
    assert load_recipe(QUICKSTART).training.max_steps is None
    recipe = load_recipe(QUICKSTART, ["training.max_steps=3"])
    assert recipe.training.max_steps == 3
    assert recipe.training.batch_size == 8  # siblings untouched


def test_override_component_option() -> None:
    recipe = load_recipe(QUICKSTART, ["method.options.r=4"])
    assert recipe.method.options.r == 4
    assert recipe.method.options.alpha == 16
    assert recipe.method.options.target_modules == ["q_proj", "v_proj"]


def test_override_list_index() -> None:
    recipe = load_recipe(QUICKSTART, ["evaluators.0=f1"])
    assert [b.name for b in recipe.evaluators] == ["f1", "f1", "loss", "perplexity"]
    recipe = load_recipe(QUICKSTART, ["evaluators.3=accuracy"])
    assert [b.name for b in recipe.evaluators] == ["accuracy", "f1", "loss", "accuracy"]


def test_override_into_a_bare_string_component() -> None:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["method"] = "lora"
    recipe = load_recipe(raw=raw, base_dir=QUICKSTART.parent, overrides=["method.options.r=2"])
    assert recipe.method.name == "lora"
    assert recipe.method.options.r == 2


def test_overrides_do_not_mutate_the_callers_dict() -> None:
    raw = yaml.safe_load(QUICKSTART.read_text())
    before = copy.deepcopy(raw)
    load_recipe(raw=raw, base_dir=QUICKSTART.parent, overrides=["training.max_steps=3", "method.options.r=4"])
    assert raw == before


def test_override_values_are_yaml_typed() -> None:
    parsed = parse_overrides([
        "training.learning_rate=1.0e-3",
        "output.overwrite=true",
        "training.max_steps=3",
        "method.options.target_modules=[q_proj, k_proj]",
        "output.dir=runs/x",
        "description=",
    ])
    assert parsed == [
        (["training", "learning_rate"], 0.001),
        (["output", "overwrite"], True),
        (["training", "max_steps"], 3),
        (["method", "options", "target_modules"], ["q_proj", "k_proj"]),
        (["output", "dir"], "runs/x"),
        (["description"], ""),
    ]
    assert type(parsed[0][1]) is float
    assert type(parsed[1][1]) is bool
    assert type(parsed[2][1]) is int


def test_typed_overrides_reach_the_validated_recipe() -> None:
    recipe = load_recipe(QUICKSTART, ["training.learning_rate=1e-3", "output.overwrite=true", "method.options.dropout=0"])
    assert type(recipe.training.learning_rate) is float and recipe.training.learning_rate == pytest.approx(1e-3)
    assert recipe.spec.output.overwrite is True
    assert recipe.method.options.dropout == 0.0


def test_exponent_without_dot_is_a_float() -> None:
    assert parse_overrides(["training.learning_rate=1e-3"]) == [(["training", "learning_rate"], 0.001)]
    assert type(parse_overrides(["training.learning_rate=1e-3"])[0][1]) is float


@pytest.mark.parametrize(
    "override, message",
    [
        ("foo", "override 'foo': expected key.sub=value"),
        ("=3", "override '=3': expected key.sub=value"),
        ("evaluators.9=f1", "override evaluators.9: 9 is not an index of the list"),
        ("evaluators.x=f1", "override evaluators.x: x is not an index of the list"),
        ("training.epochs.x=1", "override training.epochs.x: training.epochs is a value, not a section"),
    ],
)
def test_bad_override(override: str, message: str) -> None:
    err = recipe_error(QUICKSTART, [override])
    assert err.problems == [message]
    assert err.exit_code == 2


def test_override_value_is_validated() -> None:
    err = recipe_error(QUICKSTART, ["training.batch_size=0"])
    assert err.problems == ["training.batch_size: Input should be greater than 0 (got 0)"]


# --------------------------------------------------------------------------------------------
# Many mistakes at once
# --------------------------------------------------------------------------------------------


@pytest.fixture
def qa_dir(tmp_path: Path) -> Path:
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def good_raw(**changes) -> dict:
    raw = {
        "name": "qa",
        "base_model": "smollm2-135m",
        "task": {"type": "causal-lm", "prompt": "Q: {question}\nA:", "response": " {answer}"},
        "data": {"loader": "table", "options": {"path": "qa.csv"}},
        "method": {"name": "lora", "options": {"r": 8}},
        "evaluators": ["accuracy", "loss"],
        "training": {"epochs": 1, "batch_size": 4},
    }
    raw.update(changes)
    return raw


def write_recipe(folder: Path, raw: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def assert_problems(err: RecipeError, path: Path, expected: dict[str, list[str]]) -> None:
    """``expected``: field path -> fragments its line must contain. Each problem is one line
    that starts with its field path; no problem is missing and none is extra."""
    assert all("\n" not in p for p in err.problems)
    by_field = {p.split(": ", 1)[0]: p for p in err.problems}
    assert len(by_field) == len(err.problems), err.problems
    assert sorted(by_field) == sorted(expected), err.problems
    for field, fragments in expected.items():
        for fragment in fragments:
            assert fragment in by_field[field], (field, fragment, by_field[field])
    # The message: a header with the count, then one "  - " line per problem.
    lines = str(err).splitlines()
    assert lines[0] == f"{path}: {len(expected)} problems"
    assert lines[1:] == [f"  - {p}" for p in err.problems]


def test_good_qa_recipe_is_valid(qa_dir: Path) -> None:
    recipe = load_recipe(write_recipe(qa_dir, good_raw()))
    assert recipe.loader.options.path == qa_dir / "qa.csv"


def test_shape_and_name_mistakes_reported_together(qa_dir: Path) -> None:
    raw = good_raw(
        base_model="smollm-135m",
        method={"name": "loar", "options": {"r": 8}},
        evaluators=["accuracy", "acuracy"],
        training={"epoch": 2, "batch_size": -4, "learning_rate": "fast"},
        data={"loader": "table", "options": {"path": "missing.csv"}},
    )
    path = write_recipe(qa_dir, raw)
    err = recipe_error(path)
    assert_problems(err, path, {
        "method.name": ["unknown tuning method 'loar'; did you mean 'lora'?"],
        "training.epoch": ["unknown key; did you mean 'epochs'?"],
        "training.batch_size": ["greater than 0", "(got -4)"],
        "training.learning_rate": ["finite number above 0", "or auto", "(got 'fast')"],
        "data.options.path": [f"file not found: {qa_dir / 'missing.csv'}"],
        "evaluators[1].name": ["unknown evaluator 'acuracy'; did you mean 'accuracy'?"],
        "base_model": ["unknown base model alias 'smollm-135m'; did you mean 'smollm2-135m'?"],
    })
    assert err.exit_code == 2


COMPONENT_AND_DATA_MISTAKES = dict(
    base_model="smollm-135m",
    method={"name": "lora", "options": {"r": "eight"}},
    regularizers=[{"name": "weight_decy"}],
    evaluators=["accuracy", "f7"],
    task={"type": "causal-lm", "prompt": "Q: {questoin}\nA:", "response": " {answer}"},
)
COMPONENT_AND_DATA_EXPECTED = {
    "method.options.r": ["valid integer", "(got 'eight')"],
    "regularizers[0].name": ["unknown regularizer 'weight_decy'; did you mean 'weight_decay'?"],
    "evaluators[1].name": ["unknown evaluator 'f7' (installed: ", "accuracy", "perplexity"],
    "base_model": ["unknown base model alias 'smollm-135m'; did you mean 'smollm2-135m'?"],
    "task.prompt": ["column 'questoin' is not in the data; did you mean 'question'?", "(columns: question, answer)"],
}


def test_option_and_column_mistakes_reported_together(qa_dir: Path) -> None:
    path = write_recipe(qa_dir, good_raw(**COMPONENT_AND_DATA_MISTAKES))
    assert_problems(recipe_error(path), path, COMPONENT_AND_DATA_EXPECTED)


def test_column_mistake_reported_alongside_shape_mistakes(qa_dir: Path) -> None:
    raw = good_raw(**COMPONENT_AND_DATA_MISTAKES, training={"epoch": 2, "batch_size": -4})
    path = write_recipe(qa_dir, raw)
    expected = dict(COMPONENT_AND_DATA_EXPECTED)
    expected["training.epoch"] = ["did you mean 'epochs'?"]
    expected["training.batch_size"] = ["(got -4)"]
    assert_problems(recipe_error(path), path, expected)


def test_single_problem_is_one_line(qa_dir: Path) -> None:
    path = write_recipe(qa_dir, good_raw(method={"name": "loar"}))
    err = recipe_error(path)
    assert len(err.problems) == 1
    assert err.problems[0].startswith("method.name: unknown tuning method 'loar'; did you mean 'lora'? (installed: ")
    assert "lora" in err.problems[0].split("installed: ")[1]
    assert str(err) == f"{path}: {err.problems[0]}"


def test_missing_label_column_for_classification(qa_dir: Path) -> None:
    raw = good_raw(task={"type": "sequence-classification", "text": "{question}", "label": "answr"})
    err = recipe_error(write_recipe(qa_dir, raw))
    assert len(err.problems) == 1
    assert err.problems[0].startswith("task.label: column 'answr' is not in the data; did you mean 'answer'?")


def test_unknown_task_type_gets_did_you_mean_with_the_other_mistakes(qa_dir: Path) -> None:
    raw = good_raw(task={"type": "Causal-lm", "prompt": "Q: {question}\nA:", "response": " {answer}"},
                   method={"name": "loar"})
    path = write_recipe(qa_dir, raw)
    assert_problems(recipe_error(path), path, {
        "task.type": ["unknown task 'Causal-lm'; did you mean 'causal-lm'?", "(installed: ", "sequence-classification"],
        "method.name": ["did you mean 'lora'?"],
    })


@pytest.mark.parametrize("task, field, fragment", [
    ({"type": "causal-lm", "promt": "Q: {question}", "response": " {answer}"}, "task.promt", "unknown key; did you mean 'prompt'?"),
    ({"type": "causal-lm", "prompt": "Q: {question", "response": " {answer}"}, "task.prompt", "not a valid template"),
    ({"type": "causal-lm", "response": " {answer}"}, "task", "a 'response' template needs a 'prompt' template"),
    ({"type": "causal-lm"}, "task", "or a 'text' template for raw text"),
    ({"type": "sequence-classification", "text": "{question}", "labels": "yes"}, "task.labels", "valid list"),
    ({"type": "sequence-classification", "text": "{question}", "prompt": "{question}"}, "task.prompt", "unknown key"),
    ({"prompt": "{question}"}, "task.type", "Field required"),
])
def test_task_options_are_checked_by_the_task_with_field_paths(qa_dir: Path, task: dict, field: str, fragment: str) -> None:
    err = recipe_error(write_recipe(qa_dir, good_raw(task=task)))
    assert len(err.problems) == 1, err.problems
    assert err.problems[0].startswith(f"{field}: "), err.problems
    assert fragment in err.problems[0]


def test_task_block_binds_to_the_registered_task(qa_dir: Path) -> None:
    """The recipe's task is the plugin's task, built with its Options; labels given as YAML
    numbers become strings, and to_dict keeps the manifest shape older adapters have."""
    raw = good_raw(task={"type": "causal-lm", "prompt": "Q: {question}\nA:", "response": " {answer}",
                         "label": "answer", "label_words": {0: "no", 1: "yes"}})
    recipe = load_recipe(write_recipe(qa_dir, raw))
    assert type(recipe.task).__module__ == "plugtune.plugins.tasks.causal_lm"
    assert recipe.task.head == "lm" and not recipe.task.is_classification
    assert recipe.task.to_dict() == {"type": "causal-lm", "prompt": "Q: {question}\nA:", "response": " {answer}",
                                     "text": None, "label": "answer", "labels": None,
                                     "label_words": {"0": "no", "1": "yes"}}


def test_data_paths_resolve_against_the_recipe_folder(qa_dir: Path, tmp_path_factory, monkeypatch) -> None:
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(write_recipe(qa_dir, good_raw()))
    assert recipe.loader.options.path == qa_dir / "qa.csv"


# --------------------------------------------------------------------------------------------
# Broken recipe files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\n  bad: 1\n", "malformed YAML: line 2, column 6: mapping values are not allowed here"),
        ("name: x\nbase_model: [a, b\n", "malformed YAML: line 3, column 1: expected ',' or ']'"),
        ("name: 'unterminated\n", "malformed YAML: line 2, column 1: found unexpected end of stream"),
        ("\tname: x\n", "malformed YAML: line 1, column 1: found character '\\t' that cannot start any token"),
    ],
    ids=["bad-indent", "unclosed-list", "unclosed-quote", "tab"],
)
def test_malformed_yaml(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    err = recipe_error(path)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(message)
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}: malformed YAML: line ")


@pytest.mark.parametrize("text", ["- name: x\n- base_model: y\n", "just a string\n", ""], ids=["list", "scalar", "empty"])
def test_recipe_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    err = recipe_error(path)
    assert err.problems == ["a recipe is a YAML mapping (key: value lines)"]
    assert str(err) == f"{path}: a recipe is a YAML mapping (key: value lines)"


def test_recipe_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = recipe_error(path)
    assert err.problems == [f"recipe file not found: {path}"]
    assert err.exit_code == 2
    err = recipe_error(tmp_path)  # a folder is not a recipe file either
    assert err.problems == [f"recipe file not found: {tmp_path}"]


def test_recipe_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        read_recipe_file(path)
    assert info.value.problems[0].startswith("not UTF-8 text (")
    assert "at byte 9)" in info.value.problems[0]


# --------------------------------------------------------------------------------------------
# The table loader
# --------------------------------------------------------------------------------------------

ROWS = [{"text": f"row number {i}, with a comma", "label": "pos" if i % 2 else "neg"} for i in range(20)]
TEXTS = sorted(r["text"] for r in ROWS)


def write_table(folder: Path, fmt: str, rows: list[dict] = ROWS, name: str = "data", text_column: str = "text") -> Path:
    rows = [{text_column if k == "text" else k: v for k, v in r.items()} for r in rows]
    fields = list(rows[0])
    if fmt in {"csv", "tsv"}:
        path = folder / f"{name}.{fmt}"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            if fmt == "csv":
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            else:
                fh.write("\t".join(fields) + "\n")
                fh.writelines("\t".join(str(r[f]) for f in fields) + "\n" for r in rows)
    elif fmt == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def loader(base_dir: Path, **options) -> TableLoader:
    return TableLoader(TableOptions.model_validate(options, context={"base_dir": base_dir}))


def texts(rows: list[dict], key: str = "text") -> list[str]:
    return [r[key] for r in rows]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_table_formats(tmp_path: Path, fmt: str) -> None:
    path = write_table(tmp_path, fmt)
    table = loader(tmp_path, path=path.name, test_size=0.2)
    assert table.columns() == ["text", "label"]
    splits = table.load(seed=0)
    assert sorted(splits) == ["test", "train"]
    assert len(splits["train"]) == 16 and len(splits["test"]) == 4
    assert sorted(texts(splits["train"]) + texts(splits["test"])) == TEXTS  # a partition, nothing lost
    assert all(set(r) == {"text", "label"} for r in splits["train"] + splits["test"])
    assert {r["label"] for r in splits["train"] + splits["test"]} == {"pos", "neg"}


def test_format_from_option_and_unknown_extension(tmp_path: Path) -> None:
    src = write_table(tmp_path, "tsv")
    path = src.rename(tmp_path / "data.txt")
    with pytest.raises(DataError, match="cannot tell the format from the extension; set data.options.format"):
        loader(tmp_path, path=path.name).columns()
    table = loader(tmp_path, path=path.name, format="tsv")
    assert table.columns() == ["text", "label"]
    assert len(table.load(seed=0)["train"]) == 16


def test_split_is_deterministic(tmp_path: Path) -> None:
    path = write_table(tmp_path, "csv")
    first = loader(tmp_path, path=path.name).load(seed=0)
    again = loader(tmp_path, path=path.name).load(seed=0)
    other = loader(tmp_path, path=path.name).load(seed=1)
    assert texts(first["test"]) == texts(again["test"])
    assert texts(first["train"]) == texts(again["train"])
    assert sorted(texts(first["test"])) != sorted(texts(other["test"]))


def test_test_path_is_used_as_the_held_out_split(tmp_path: Path) -> None:
    write_table(tmp_path, "csv", ROWS[:15], name="train")
    write_table(tmp_path, "csv", ROWS[15:], name="test")
    splits = loader(tmp_path, path="train.csv", test_path="test.csv").load(seed=0)
    assert sorted(texts(splits["train"])) == sorted(texts(ROWS[:15]))
    assert sorted(texts(splits["test"])) == sorted(texts(ROWS[15:]))


def test_column_rename(tmp_path: Path) -> None:
    path = write_table(tmp_path, "tsv", text_column="sentence")
    assert loader(tmp_path, path=path.name).columns() == ["sentence", "label"]
    table = loader(tmp_path, path=path.name, columns={"text": "sentence"})
    assert table.columns() == ["text", "label"]
    splits = table.load(seed=0)
    assert all(set(r) == {"text", "label"} for r in splits["train"] + splits["test"])
    assert sorted(texts(splits["train"]) + texts(splits["test"])) == TEXTS


def test_column_rename_of_a_missing_column(tmp_path: Path) -> None:
    path = write_table(tmp_path, "tsv", text_column="sentence")
    with pytest.raises(DataError, match=r"columns: 'sentense' not in data.tsv \(columns: sentence, label\)"):
        loader(tmp_path, path=path.name, columns={"text": "sentense"}).columns()


def test_max_rows(tmp_path: Path) -> None:
    path = write_table(tmp_path, "jsonl")
    full = loader(tmp_path, path=path.name).load(seed=0)
    small = loader(tmp_path, path=path.name, max_train_rows=5, max_test_rows=2).load(seed=0)
    assert len(small["train"]) == 5 and len(small["test"]) == 2
    assert set(texts(small["train"])) <= set(texts(full["train"]))  # a subset of the same split
    assert set(texts(small["test"])) <= set(texts(full["test"]))
    assert small == loader(tmp_path, path=path.name, max_train_rows=5, max_test_rows=2).load(seed=0)
    bigger = loader(tmp_path, path=path.name, max_train_rows=100).load(seed=0)
    assert len(bigger["train"]) == 16


def test_missing_data_file_option(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="file not found"):
        loader(tmp_path, path="nope.csv")


@pytest.mark.parametrize("name", ["empty.csv", "empty.tsv", "empty.jsonl"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("\n" if name.endswith("jsonl") else "")
    table = loader(tmp_path, path=name)
    with pytest.raises(DataError) as info:
        table.columns()
    assert str(info.value) == f"{tmp_path / name}: the file is empty"
    with pytest.raises(DataError) as info:
        table.load(seed=0)
    assert str(info.value).startswith(f"{tmp_path / name}: ")


def test_header_only_csv_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "header.csv").write_text("text,label\n")
    table = loader(tmp_path, path="header.csv")
    assert table.columns() == ["text", "label"]  # passes validation...
    with pytest.raises(DataError, match=str(tmp_path / "header.csv")):
        table.load(seed=0)  # ...but loading says what is wrong


def test_header_only_csv_says_no_rows(tmp_path: Path) -> None:
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        loader(tmp_path, path="header.csv").load(seed=0)


def test_single_row_cannot_be_split(tmp_path: Path) -> None:
    path = write_table(tmp_path, "csv", ROWS[:1])
    with pytest.raises(DataError, match=r"1 row\(s\) cannot be split into train and test"):
        loader(tmp_path, path=path.name).load(seed=0)


def write_latin1(folder: Path, fmt: str) -> Path:
    if fmt == "csv":
        body = "text,label\n" + "".join(f"caf\xe9 {i},pos\n" for i in range(10))
    else:
        body = "".join(json.dumps({"text": f"caf\xe9 {i}", "label": "pos"}, ensure_ascii=False) + "\n" for i in range(10))
    path = folder / f"latin1.{fmt}"
    path.write_bytes(body.encode("latin-1"))
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_non_utf8_header_check(tmp_path: Path, fmt: str) -> None:
    path = write_latin1(tmp_path, fmt)
    with pytest.raises(DataError) as info:
        loader(tmp_path, path=path.name).columns()
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text (byte ")
    assert message.endswith("); re-save it as UTF-8")


def test_non_utf8_csv_load(tmp_path: Path) -> None:
    path = write_latin1(tmp_path, "csv")
    with pytest.raises(DataError) as info:
        loader(tmp_path, path=path.name).load(seed=0)
    assert str(info.value).startswith(f"{path}: ")
    assert "utf-8" in str(info.value).lower()


def test_non_utf8_jsonl_load(tmp_path: Path) -> None:
    path = write_latin1(tmp_path, "jsonl")
    with pytest.raises(DataError) as info:
        loader(tmp_path, path=path.name).load(seed=0)
    assert "UTF-8" in str(info.value)
