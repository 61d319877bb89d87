"""``plugtune report``: runs -> figures -> one self-contained HTML page, and a PNG of the losses.

    runs = read_runs(["adapters/a", "adapters/b"])     # core/reporting/runs.py
    write_report(runs, Path("report.html"))            # report.html + report.png, each staged and renamed

The page opens with no network: plotly draws it, its JavaScript inlined once in the head
(``plotly.offline.get_plotlyjs()``), every figure a div that uses it. Runs are overlaid, one
colour per run on every plot (:func:`colours`), the legend naming the run. Sections: the
runs (what the manifests say), the losses, learning rate and gradient norm over steps, every
evaluation metric over steps (a small plot each, every split), the before/after table (first
and last evaluation of each split and metric, and the change), a heatmap of each matrix an
evaluator recorded (the confusion matrix), and the data summary (rows per split and per
source, token-length percentiles). A plot no run recorded says so instead of drawing
nothing; runs lacking it are named under it.

The PNG (matplotlib, Agg canvas: no display, no pyplot state) has the loss curves only, for
terminals and READMEs.
"""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugtune.artifacts.outputs import fsync_dir, fsync_write
from plugtune.reporting.runs import ReportError, Run, finite, points

# The training records' fields drawn over steps (core/training/metrics_log.py), with their titles;
# the first, the loss, is also the PNG's.
CURVES = {"loss": "training and evaluation loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)"}
LOSS_CURVE = next(iter(CURVES.items()))
SKIPPED_FIELDS = frozenset({"event", "split", "step", "when", "details"})  # an evaluation record's non-metrics
DASHES = {"test": "solid", "train": "dot"}  # by split; other splits "dash"
PLOT_HEIGHT = 380
SMALL_PLOT_HEIGHT = 300
MAX_POINTS = 5000  # per trace: a long run's every step would make the page heavy and add nothing visible
CONFIG = {"displaylogo": False, "responsive": True}


def _require() -> tuple[Any, Any]:
    """plotly and matplotlib, or one line naming the extra."""
    try:
        import matplotlib
        import plotly
    except ImportError as exc:
        raise ReportError(f"plugtune report needs plotly and matplotlib ({exc.name} is missing): "
                          f"pip install 'plugtune[report]'") from None
    return plotly, matplotlib


def default_output(folders: list[str]) -> Path:
    """``<dir>/report.html`` for one run, ``report.html`` here for several."""
    return Path(folders[0]) / "report.html" if len(folders) == 1 else Path("report.html")


def png_path(html_path: Path) -> Path:
    """The PNG beside the page: ``<stem>.png``."""
    return html_path.with_suffix(".png")


# -- colours and series -----------------------------------------------------------------------


def colours(runs: list[Run]) -> dict[str, str]:
    """One colour per run, the same in every plot and in the PNG."""
    from plotly.colors import qualitative

    palette = qualitative.Plotly
    return {run.name: palette[i % len(palette)] for i, run in enumerate(runs)}


def _thin(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """At most :data:`MAX_POINTS` evenly spaced points, the last kept."""
    if len(steps) <= MAX_POINTS:
        return steps, values
    stride = -(-len(steps) // MAX_POINTS)
    keep = list(range(0, len(steps), stride))
    if keep[-1] != len(steps) - 1:
        keep.append(len(steps) - 1)
    return [steps[i] for i in keep], [values[i] for i in keep]


def _split_records(run: Run, split: str) -> list[dict[str, Any]]:
    return [r for r in run.evals if str(r.get("split", "test")) == split]


def metric_names(runs: list[Run]) -> list[str]:
    """Every float metric of the runs' evaluations, in first-seen order, without the flat
    cells a matrix in ``details`` also holds (``metrics_prefix``: drawn as its heatmap)."""
    prefixes = {str(m.get("metrics_prefix")) for run in runs for m in _matrices(run.evals) if m.get("metrics_prefix")}
    names: dict[str, None] = {}
    for run in runs:
        for record in run.evals:
            for key, value in record.items():
                if key not in SKIPPED_FIELDS and finite(value) is not None and not any(key.startswith(p) for p in prefixes):
                    names.setdefault(key, None)
    return list(names)


def _matrices(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for r in records if isinstance(r.get("details"), dict)
            for m in r["details"].values() if isinstance(m, dict) and m.get("kind") == "matrix"]


# -- figures ------------------------------------------------------------------------------------


@dataclass
class Plot:
    """One figure of the page, or the line said instead when no run recorded it."""

    div_id: str
    title: str
    figure: Any = None
    missing_in: tuple[str, ...] = ()  # runs that did not record it
    absent: str = ""  # said instead of a figure


def _line_plot(div_id: str, title: str, runs: list[Run], colour: dict[str, str], y_title: str,
               series: Callable[[Run], list[tuple[str, str, list[int], list[float]]]], height: int = PLOT_HEIGHT) -> Plot:
    """A plot of ``series(run)`` for every run: ``(label, dash, steps, values)`` each."""
    import plotly.graph_objects as go

    figure = go.Figure()
    missing = []
    for run in runs:
        drawn = False
        for label, dash, steps, values in series(run):
            if not steps:
                continue
            steps, values = _thin(steps, values)
            figure.add_trace(go.Scatter(
                x=steps, y=values, name=_plotly_text(label), legendgroup=_plotly_text(run.name),
                mode="lines+markers" if len(steps) <= 40 or dash != "solid" else "lines",
                line={"color": colour[run.name], "dash": dash}, marker={"size": 5}))
            drawn = True
        if not drawn:
            missing.append(run.name)
    if len(missing) == len(runs):
        return Plot(div_id, title, absent=f"{title}: not recorded in {_these(runs)}")
    figure.update_layout(title={"text": _plotly_text(title)}, height=height, margin={"l": 60, "r": 20, "t": 50, "b": 45},
                         xaxis_title="step", yaxis_title=_plotly_text(y_title), template="plotly_white",
                         legend={"orientation": "h", "y": -0.22})
    return Plot(div_id, title, figure, tuple(missing))


def _these(runs: list[Run]) -> str:
    return "this run" if len(runs) == 1 else "these runs"


def _labelled(run: Run, several_splits: bool, split: str) -> str:
    """The legend entry of a run's line: the run, and the split when the page has several."""
    return f"{run.name} · {split}" if several_splits else run.name


def curve_plot(runs: list[Run], colour: dict[str, str], key: str, title: str, div_id: str) -> Plot:
    """One field of the training records over steps (solid), with the evaluation records'
    field of the same name where they have one (dashed, every split): training and
    evaluation loss on one plot."""

    def series(run: Run) -> list[tuple[str, str, list[int], list[float]]]:
        out = [(f"{run.name} · train", "solid", *points(run.train, key))]
        for split in run.eval_splits():
            out.append((f"{run.name} · {split} evaluation", "dash", *points(_split_records(run, split), key)))
        return out

    return _line_plot(div_id, title, runs, colour, key, series)


def metric_plots(runs: list[Run], colour: dict[str, str]) -> list[Plot]:
    """One small plot per evaluation metric, a line per run and split."""
    several = len({s for run in runs for s in run.eval_splits()}) > 1

    def for_metric(metric: str) -> Callable[[Run], list[tuple[str, str, list[int], list[float]]]]:
        return lambda run: [(_labelled(run, several, split), DASHES.get(split, "dash"),
                             *points(_split_records(run, split), metric)) for split in run.eval_splits()]

    return [_line_plot(f"plot-metric-{i}", metric, runs, colour, metric, for_metric(metric), SMALL_PLOT_HEIGHT)
            for i, metric in enumerate(metric_names(runs))]


def matrix_plots(runs: list[Run]) -> list[Plot]:
    """A heatmap of each matrix in a run's last test evaluation that has one (per run)."""
    import plotly.graph_objects as go

    plots = []
    for i, run in enumerate(runs):
        last = next((r for r in reversed(_split_records(run, "test")) if _matrices([r])), None)
        if last is None:
            continue
        named = [(k, m) for k, m in last["details"].items() if isinstance(m, dict) and m.get("kind") == "matrix"]
        for j, (name, matrix) in enumerate(named):
            rows, columns, values = _matrix_cells(matrix)
            if not rows:
                continue
            title = f"{run.name}: {name} (step {last.get('step')})"
            figure = go.Figure(go.Heatmap(z=values, x=[_plotly_text(c) for c in columns], y=[_plotly_text(r) for r in rows],
                                          colorscale="Blues", zmin=0, texttemplate="%{z}", hoverongaps=False))
            figure.update_layout(title={"text": _plotly_text(title)}, template="plotly_white",
                                 height=max(SMALL_PLOT_HEIGHT, 80 + 40 * len(rows)),
                                 xaxis_title=_plotly_text(str(matrix.get("column_title", ""))),
                                 yaxis={"title": _plotly_text(str(matrix.get("row_title", ""))), "autorange": "reversed"})
            plots.append(Plot(f"plot-matrix-{i}-{j}", title, figure))
    return plots


def _matrix_cells(matrix: dict[str, Any]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Rows, columns and values of a logged matrix; a malformed one is empty (not drawn)."""
    rows, columns, values = matrix.get("rows"), matrix.get("columns"), matrix.get("values")
    if not (isinstance(rows, list) and isinstance(columns, list) and isinstance(values, list)) or len(values) != len(rows):
        return [], [], []
    if any(not isinstance(row, list) or len(row) != len(columns) for row in values):
        return [], [], []
    return [str(r) for r in rows], [str(c) for c in columns], [[finite(v) for v in row] for row in values]


def _plotly_text(text: str) -> str:
    """``text`` for a plotly label: plotly reads a few HTML tags in labels, so ``<``, ``>``
    and ``&`` are escaped (it shows the entities as the characters)."""
    return html.escape(text, quote=False)


# -- tables ------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    number = finite(value)
    if number is None:
        return "–"
    return f"{int(number)}" if number == int(number) and abs(number) < 1e15 else f"{number:.4g}"


def before_after(run: Run) -> list[tuple[str, str, Any, Any, str, str]]:
    """``(split, metric, first, last, first step, last step)`` for every split and metric of
    the run's evaluations; from the manifest's before/after when the log has none."""
    rows = []
    names = metric_names([run])
    for split in run.eval_splits():
        records = _split_records(run, split)
        for metric in names:
            having = [r for r in records if finite(r.get(metric)) is not None]
            if having:
                first, last = having[0], having[-1]
                rows.append((split, metric, first.get(metric), last.get(metric), str(first.get("step")),
                             f"{last.get('step')}{' (best)' if last.get('when') == 'best' else ''}"))
    if rows or run.manifest is None:
        return rows
    metrics = run.manifest.metrics or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    return [("test", m, before.get(m), after.get(m), "before", "after") for m in {**before, **after}
            if finite(before.get(m)) is not None or finite(after.get(m)) is not None]


def before_after_table(runs: list[Run]) -> str:
    body = []
    for run in runs:
        for split, metric, first, last, first_step, last_step in before_after(run):
            a, b = finite(first), finite(last)
            change = f"{b - a:+.4g}" if a is not None and b is not None else "–"
            body.append(f"<tr><td>{_h(run.name)}</td><td>{_h(split)}</td><td>{_h(metric)}</td>"
                        f"<td>{_number(first)} <small>step {_h(first_step)}</small></td>"
                        f"<td>{_number(last)} <small>step {_h(last_step)}</small></td><td>{change}</td></tr>")
    if not body:
        return f"<p class='absent'>before/after: no evaluation recorded in {_these(runs)}</p>"
    return ("<table><thead><tr><th>run</th><th>split</th><th>metric</th><th>first</th><th>last</th><th>change</th>"
            "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")


def data_tables(run: Run) -> str:
    """Rows and token lengths per split, and each source's counts, from the log's ``data``
    record (rows only from the manifest of a run that predates it)."""
    head = f"<h3>{_h(run.name)}</h3>"
    record = run.data
    if record is None:
        training = (run.manifest.training or {}) if run.manifest is not None else {}
        if not training.get("train_rows"):
            return head + "<p class='absent'>data summary: not recorded in this run</p>"
        return (head + f"<p>train {_number(training.get('train_rows'))} rows, test {_number(training.get('test_rows'))} rows "
                f"<span class='absent'>(token lengths not recorded in this run)</span></p>") + _sources_table(training.get("sources"))
    splits = record.get("splits") if isinstance(record.get("splits"), dict) else {}
    rows = []
    for split, summary in splits.items():
        summary = summary if isinstance(summary, dict) else {}
        tokens = summary.get("tokens") if isinstance(summary.get("tokens"), dict) else {}
        rows.append(f"<tr><td>{_h(str(split))}</td><td>{_number(summary.get('rows'))}</td>"
                    + "".join(f"<td>{_number(tokens.get(k))}</td>" for k in ("p50", "p90", "p99", "max")) + "</tr>")
    note = " <small>(train: its in-memory sample; the split is streamed)</small>" if record.get("streamed") else ""
    table = ("<table><thead><tr><th>split</th><th>rows</th><th>tokens p50</th><th>p90</th><th>p99</th><th>max</th></tr>"
             "</thead><tbody>" + "".join(rows) + f"</tbody></table>{note}")
    return head + table + _sources_table(record.get("sources"))


def _sources_table(sources: Any) -> str:
    if not isinstance(sources, list) or not sources:
        return ""
    rows = []
    for source in sources:
        if not isinstance(source, dict):
            continue
        cells = [_h(str(source.get("name", ""))), _h(str(source.get("loader", ""))), _number(source.get("weight"))]
        for key in ("rows_read", "rows_kept", "truncated", "dropped"):
            counts = source.get(key) if isinstance(source.get(key), dict) else {}
            cells += [_number(counts.get("train")), _number(counts.get("test"))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr><th rowspan=2>source</th><th rowspan=2>loader</th><th rowspan=2>weight</th>"
            "<th colspan=2>read</th><th colspan=2>kept</th><th colspan=2>truncated</th><th colspan=2>dropped</th></tr>"
            "<tr>" + "<th>train</th><th>test</th>" * 4 + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def run_summary(run: Run, colour: str) -> str:
    """What the manifest says about the run, and what reading it warned about."""
    facts = [f"folder <code>{_h(str(run.folder))}</code>"]
    manifest = run.manifest
    if manifest is not None:
        method = manifest.method.name if manifest.method is not None else ""
        base = manifest.base_model.id if manifest.base_model is not None else ""
        training = manifest.training or {}
        facts += [f"base <code>{_h(str(base))}</code>", f"method {_h(str(method))}",
                  f"{_number(training.get('steps'))} steps in {_number(training.get('train_seconds'))} s",
                  f"{_number(training.get('trainable_parameters'))} trainable parameters"]
    else:
        facts.append("no adapter saved (no plugtune.json)")
    warnings = "".join(f"<li class='warn'>{_h(w)}</li>" for w in run.warnings)
    return (f"<li><span class='swatch' style='background:{colour}'></span><b>{_h(run.name)}</b>: "
            + ", ".join(facts) + (f"<ul>{warnings}</ul>" if warnings else "") + "</li>")


def _h(text: str) -> str:
    return html.escape(text)


# -- the page and the PNG ------------------------------------------------------------------------


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 8px; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } td:first-child, th:first-child { text-align: left; }
.absent { color: #888; font-style: italic; } .warn { color: #a60; } .note { color: #666; font-size: .85em; }
.swatch { display: inline-block; width: .9em; height: .9em; margin-right: .4em; vertical-align: middle; }
"""


def _plot_html(plot: Plot) -> str:
    if plot.figure is None:
        return f"<div class='plot absent' id='{plot.div_id}'>{_h(plot.absent)}</div>"
    import plotly.io as pio

    div = pio.to_html(plot.figure, full_html=False, include_plotlyjs=False, div_id=plot.div_id, config=CONFIG)
    note = (f"<div class='note'>not recorded in: {_h(', '.join(plot.missing_in))}</div>" if plot.missing_in else "")
    return f"<div class='plot'>{div}{note}</div>"


def render_html(runs: list[Run]) -> str:
    """The whole page, plotly.js inlined once."""
    from plotly.offline import get_plotlyjs

    colour = colours(runs)
    curves = [curve_plot(runs, colour, key, title, f"plot-{key.replace('_', '-')}") for key, title in CURVES.items()]
    metrics, matrices = metric_plots(runs, colour), matrix_plots(runs)
    names = ", ".join(run.name for run in runs)
    sections = [
        f"<h1>plugtune report: {_h(names)}</h1>",
        "<h2>Runs</h2><ul>" + "".join(run_summary(run, colour[run.name]) for run in runs) + "</ul>",
        "<h2>Training</h2>" + "".join(_plot_html(p) for p in curves),
        "<h2>Evaluations over steps</h2>"
        + (f"<div class='grid'>{''.join(_plot_html(p) for p in metrics)}</div>" if metrics
           else f"<p class='absent'>evaluations: not recorded in {_these(runs)}</p>"),
        "<h2>Before and after</h2>" + before_after_table(runs),
        "<h2>Confusion matrices</h2>"
        + (f"<div class='grid'>{''.join(_plot_html(p) for p in matrices)}</div>" if matrices
           else f"<p class='absent'>not recorded in {_these(runs)} (no evaluator of the recipe records a matrix)</p>"),
        "<h2>Data</h2>" + "".join(data_tables(run) for run in runs),
    ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>plugtune report: {_h(names)}</title><style>{STYLE}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(sections) + "</body></html>\n")


def render_png(runs: list[Run], key: str, title: str) -> bytes:
    """One curve as a PNG (the loss, for READMEs): the training records' ``key`` solid, the
    evaluation records' dashed with markers, one colour per run as on the page."""
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colour = colours(runs)
    figure = Figure(figsize=(8, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    drawn = False
    for run in runs:
        label = _mpl_text(run.name)
        steps, values = _thin(*points(run.train, key))
        if steps:
            axes.plot(steps, values, color=colour[run.name], linewidth=1.6, label=f"{label} · train")
            drawn = True
        for split in run.eval_splits():
            steps, values = points(_split_records(run, split), key)
            if steps:
                axes.plot(steps, values, color=colour[run.name], linestyle="--", marker="o", markersize=4,
                          label=f"{label} · {split} evaluation")
                drawn = True
    if drawn:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, f"{key}: not recorded in {_these(runs)}", ha="center", va="center", transform=axes.transAxes)
    axes.set(xlabel="step", ylabel=key, title=title)
    axes.grid(alpha=0.3)
    out = BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def _mpl_text(text: str) -> str:
    """``text`` for a matplotlib label: ``$`` starts mathtext there, so it is escaped."""
    return text.replace("$", r"\$")


def write_report(runs: list[Run], html_path: Path) -> tuple[Path, Path]:
    """Write the page and the PNG beside it; both are rendered and staged in their folder
    before either replaces an older one, so a failure leaves nothing half-written."""
    _require()
    html_path = Path(html_path)
    png = png_path(html_path)
    contents = [(html_path, render_html(runs).encode("utf-8")), (png, render_png(runs, *LOSS_CURVE))]
    staged: list[tuple[Path, Path]] = []
    try:
        for target, data in contents:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-")
            os.close(fd)
            staged.append((Path(name), target))
            os.chmod(name, 0o666 & ~_umask())  # mkstemp's 0600 would make the page private to its writer
            fsync_write(Path(name), data)
        for temporary, target in staged:
            os.replace(temporary, target)
    except OSError as exc:
        raise ReportError(f"could not write {html_path} ({exc.strerror or exc})") from None
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    fsync_dir(html_path.parent)
    return html_path, png


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
