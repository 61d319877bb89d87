"""``plugtune report`` and the log records it reads (core/reporting, core/training/metrics_log.py).

Two tiny runs are trained once (a causal LM and a classifier with a confusion matrix, each
evaluated every 4 steps); the page is opened in headless Chromium where it is installed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

pytest.importorskip("plotly")
pytest.importorskip("matplotlib")

import plugtune  # noqa: E402
from plugtune.cli import main  # noqa: E402
from plugtune.reporting.runs import points, read_run, read_runs  # noqa: E402
from plugtune.testing import recipe_dict  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--virtual-time-budget=10000"]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_llama, tiny_bert, tiny_data) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report-runs")
    made = []
    for name, classification, extra in (
            ("words", False, {}),
            ("sentiment", True, {"evaluators": ["accuracy", "f1", "loss", "confusion_matrix"]})):
        recipe = recipe_dict(tiny_bert if classification else tiny_llama, tiny_data, classification=classification,
                             name=name, output={"dir": str(root / name)}, **extra)
        recipe["training"].update(max_steps=8, eval_every=4)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        plugtune.run(path, show_progress=False)
        made.append(root / name)
    return made[0], made[1]


@pytest.fixture(scope="module")
def report(two_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "x.html"
    assert main(["report", str(two_runs[0]), str(two_runs[1]), "-o", str(out)]) == 0
    return out


# -- what the run records ------------------------------------------------------------------------


def test_a_run_logs_grad_norm_the_data_summary_and_the_confusion_matrix(two_runs) -> None:
    for folder in two_runs:
        records = _records(folder)
        manifest = json.loads((folder / "plugtune.json").read_text())
        data = [r for r in records if r["event"] == "data"]
        assert len(data) == 1 and records[0]["event"] == "data"  # once, before any evaluation
        splits = data[0]["splits"]
        assert splits["train"]["rows"] == manifest["training"]["train_rows"]
        assert splits["test"]["rows"] == manifest["training"]["test_rows"]
        tokens = splits["train"]["tokens"]
        assert 0 < tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"] <= 48
        assert data[0]["sources"][0]["rows_kept"]["train"] == splits["train"]["rows"]
        train = [r for r in records if r["event"] == "train"]
        assert len(train) == 8 and all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train)
    evals = [r for r in _records(two_runs[1]) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]
    for record in evals:
        matrix = record["details"]["confusion_matrix"]
        assert matrix["rows"] == ["negative", "positive"] == matrix["columns"]
        # the same cells as the flat metrics, and every test row counted once
        assert matrix["values"] == [[record[f"confusion/{t}/{p}"] for p in matrix["columns"]] for t in matrix["rows"]]
        assert sum(map(sum, matrix["values"])) == json.loads((two_runs[1] / "plugtune.json").read_text())["training"]["test_rows"]
        assert all(isinstance(v, float) or isinstance(v, int) for k, v in record.items()
                   if k not in {"event", "split", "when", "details"})  # metrics stay numbers


# -- the page ------------------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_the_page_is_self_contained_with_one_copy_of_plotly(report) -> None:
    from plotly.offline import get_plotlyjs

    page = report.read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    parser.close()
    referenced = [(tag, a.get("src") or a.get("href")) for tag, a in parser.tags
                  if tag in {"script", "link", "img", "iframe"} and (a.get("src") or a.get("href"))]
    assert referenced == []  # nothing loaded from anywhere, http(s) or a file
    assert page.count(get_plotlyjs()[:500]) == 1
    ids = {a.get("id") for tag, a in parser.tags if tag == "div"}
    assert {"plot-loss", "plot-lr", "plot-grad-norm", "plot-matrix-1-0"} <= ids
    assert "not recorded" not in page.split("<h2>Evaluations")[0]  # both runs recorded every curve
    assert "words" in page and "sentiment" in page
    assert report.with_suffix(".png").exists()
    assert not list(report.parent.glob(".*tmp*"))  # the staging files are gone


def _plot_segments(dom: str) -> dict[str, str]:
    """Each rendered plot div's markup (up to the next plot), by id."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="(plot-[\w-]+)" class="plotly-graph-div', dom)]
    return {name: dom[start: (starts[i + 1][0] if i + 1 < len(starts) else len(dom))] for i, (start, name) in enumerate(starts)}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_every_plot_renders_with_both_runs_in_headless_chromium(report, tmp_path) -> None:
    from PIL import Image

    flags = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    plots = _plot_segments(dom)
    assert {"plot-loss", "plot-lr", "plot-grad-norm", "plot-matrix-1-0"} <= set(plots)
    for name, markup in plots.items():
        assert 'class="main-svg"' in markup, f"{name} drew no SVG"
        if name.startswith("plot-matrix"):
            assert 'class="hm"' in markup  # the heatmap's image
            continue
        # each trace's line: a path through two points or more, stroked in its run's colour
        lines = [re.search(r'class="js-line" d="M[\d.]+,[\d.]+L[^"]*" style="[^"]*stroke: (rgb\([^)]*\))', trace)
                 for trace in markup.split('<g class="trace scatter')[1:]]
        drawn = {line.group(1) for line in lines if line}
        assert drawn, f"{name}: no line drawn"
        legend = set(re.findall(r'class="legendtext"[^>]*>([^<]*)<', markup))
        owners = {entry.split(" · ")[0] for entry in legend}
        if name in {"plot-loss", "plot-lr", "plot-grad-norm", "plot-metric-0"}:  # metric 0: accuracy, both runs
            assert owners == {"words", "sentiment"}, (name, legend)
            assert drawn == {"rgb(99, 110, 250)", "rgb(239, 85, 59)"}, (name, drawn)  # one colour per run
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()], capture_output=True,
                   timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    assert len(image.getcolors(maxcolors=1 << 20)) > 200  # lines, text and fills: not a blank page


def test_the_png_shows_the_loss_curves(report) -> None:
    import matplotlib.image
    from PIL import Image

    png = report.with_suffix(".png")
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    colours = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 100
    blue, red = (99, 110, 250), (239, 85, 59)  # the first two runs' colours, as on the page
    present = {c for _, c in colours}
    assert blue in present and red in present


def test_one_run_reports_into_its_folder(two_runs, capsys) -> None:
    assert main(["report", str(two_runs[0])]) == 0
    assert (two_runs[0] / "report.html").exists() and (two_runs[0] / "report.png").exists()
    assert str(two_runs[0] / "report.html") in capsys.readouterr().out


# -- hostile folders and outputs -----------------------------------------------------------------


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_folder_that_is_neither_a_run_nor_an_adapter_is_one_line(tmp_path, capsys, two_runs) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.html"
    err = _fails(["report", str(two_runs[0]), str(tmp_path / "empty"), "-o", str(out)], capsys)
    assert str(tmp_path / "empty") in err and "metrics.jsonl" in err and "plugtune.json" in err
    assert "does not exist" in _fails(["report", str(tmp_path / "missing"), "-o", str(out)], capsys)
    assert _fails(["report", str(tmp_path / "missing")], capsys).startswith(f"error: {tmp_path / 'missing'} does not exist")
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_an_output_folder_that_does_not_exist_or_a_png_name_is_refused(tmp_path, capsys, two_runs) -> None:
    assert "does not exist" in _fails(["report", str(two_runs[0]), "-o", str(tmp_path / "no" / "r.html")], capsys)
    assert "give an .html file" in _fails(["report", str(two_runs[0]), "-o", str(tmp_path / "r.png")], capsys)
    (tmp_path / "r.png").mkdir()
    assert "is a folder" in _fails(["report", str(two_runs[0]), "-o", str(tmp_path / "r.html")], capsys)


def test_truncated_and_nan_lines_are_skipped_with_one_warning(tmp_path, capsys, two_runs) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = (two_runs[0] / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["event"] == "train"]
    nan = dict(train[0], step=99, loss=float("nan"), grad_norm=float("inf"), lr="fast")
    (run / "metrics.jsonl").write_text("\n".join([*lines[:3], '{"event": "train", "st', "[1, 2]", *lines[3:],
                                                  json.dumps(nan), lines[-1][: len(lines[-1]) // 2]]))
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped 3 unreadable lines (first: line 4)" in err
    read = read_run(run)
    steps, losses = points(read.train, "loss")
    assert 99 not in steps and all(math.isfinite(v) for v in losses)
    assert len(steps) == len(train)
    assert points([{"step": 1, "x": True}, {"step": "2", "x": 1.0}, {"step": 3, "x": 2}], "x") == ([3], [2.0])


def test_an_empty_log_and_an_older_log_report_what_is_there(tmp_path, capsys, two_runs) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    older = tmp_path / "older"
    shutil.copytree(two_runs[1], older)
    records = [{k: v for k, v in r.items() if k not in {"grad_norm", "details"}} for r in _records(two_runs[1])
               if r["event"] != "data"]
    (older / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "r.html"
    assert main(["report", str(empty), str(older), "-o", str(out)]) == 0
    page = out.read_text()
    assert "gradient norm (before clipping): not recorded in these runs" in page
    assert "not recorded in: empty" in page  # under the loss plot, which the older run has
    assert "data summary: not recorded in this run" in page  # the empty one
    assert "token lengths not recorded in this run" in page  # the older one: its manifest's rows
    assert "no evaluator of the recipe records a matrix" in page


def test_two_runs_with_one_name_are_told_apart_by_their_folders(tmp_path, two_runs) -> None:
    for where in ("a", "b"):
        shutil.copytree(two_runs[0], tmp_path / where / "words")
    runs = read_runs([tmp_path / "a" / "words", tmp_path / "b" / "words"])
    assert [r.name for r in runs] == ["words (a/words)", "words (b/words)"]


def test_the_same_folder_twice_is_refused(capsys, two_runs, tmp_path) -> None:
    assert "given twice" in _fails(["report", str(two_runs[0]), str(two_runs[0]), "-o", str(tmp_path / "r.html")], capsys)


def test_a_log_linked_from_outside_its_folder_is_not_read(tmp_path, capsys, two_runs) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(two_runs[1] / "metrics.jsonl")
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert "a link out of the folder" in capsys.readouterr().err
    assert read_run(run).train == []


def test_odd_run_names_are_escaped(tmp_path, two_runs) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    manifest = json.loads((run / "plugtune.json").read_text())
    manifest["name"] = "<script>alert(1)</script> $x$ & ü"
    (run / "plugtune.json").write_text(json.dumps(manifest))
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


def test_an_over_long_line_and_a_huge_log_are_read_in_bounded_pieces(tmp_path, monkeypatch, two_runs) -> None:
    from plugtune.reporting import runs as reading

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    long_line = json.dumps({"event": "train", "step": 50, "loss": 1.0, "pad": "x" * 5000})
    (run / "metrics.jsonl").write_text("\n".join([lines[0], long_line, *lines[1:]]) + "\n")
    monkeypatch.setattr(reading, "MAX_LINE_BYTES", 1000)
    read = read_run(run)
    assert 50 not in points(read.train, "loss")[0] and len(read.train) == 8
    assert read.warnings == [f"{run / 'metrics.jsonl'}: skipped 1 unreadable line (first: line 2); reporting the rest"]
    monkeypatch.setattr(reading, "MAX_LOG_BYTES", sum(len(line) + 1 for line in [lines[0], long_line, *lines[1:5]]))  # data, eval at 0, steps 1-3
    read = read_run(run)
    assert [r["step"] for r in read.train] == [1, 2, 3]  # the records inside the limit
    assert any("reporting its first" in w for w in read.warnings)


def test_an_adapter_without_its_log_reports_its_manifest(tmp_path, two_runs) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(two_runs[1], adapter)
    (adapter / "metrics.jsonl").unlink()
    run = read_run(adapter)
    manifest = json.loads((adapter / "plugtune.json").read_text())["metrics"]
    from plugtune.reporting.report import before_after

    rows = {metric: (first, last) for _, metric, first, last, _, _ in before_after(run)}
    assert rows["accuracy"] == (manifest["before"]["accuracy"], manifest["after"]["accuracy"])
    assert main(["report", str(adapter)]) == 0
    page = (adapter / "report.html").read_text()
    assert "training and evaluation loss: not recorded in this run" in page
    assert "train 192 rows" in page  # the data summary from the manifest


def test_the_confusion_matrix_details_are_its_cells_as_json() -> None:
    from plugtune.data.tasks import build_task
    from plugtune.plugins.evaluators.classification import ConfusionMatrix, ConfusionOptions
    from plugtune.sdk import EvalBatch

    task = build_task(dict(type="sequence-classification", text="{text}", labels=["a", "b", "c"]))
    for normalize in (False, True):
        matrix = ConfusionMatrix(ConfusionOptions(normalize=normalize), task)
        matrix.reset()
        matrix.update(EvalBatch([0, 1, 1, 0], [0, 1, 0, 0], 0.0, 4))  # no example of class c
        flat, (name, details), = matrix.compute(), *matrix.details().items()
        assert name == "confusion_matrix" and details["rows"] == details["columns"] == ["a", "b", "c"]
        for t, row in zip(details["rows"], details["values"]):
            for p, value in zip(details["columns"], row):
                cell = flat[f"confusion/{t}/{p}"]
                assert value == (None if cell != cell else cell)  # a NaN cell (normalized, class c absent) is null
        json.dumps(details, allow_nan=False)  # strict JSON: no NaN in the log's details
    assert details["values"][0] == pytest.approx([2 / 3, 1 / 3, 0.0]) and details["values"][2] == [None, None, None]
