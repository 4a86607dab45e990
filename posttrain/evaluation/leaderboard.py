"""The leaderboard: every model × benchmark in the results store, as markdown and as one self-contained HTML page.

`write_leaderboard` shows the newest result per (model, benchmark) (`ResultsStore.latest`), its headline metric ± its
standard error, the best value per benchmark marked, one bar panel per benchmark, and the training curves of every run dir
under `runs/`. The markdown is built here line by line; the HTML is rendered from the Jinja2 template
`templates/leaderboard.html.j2` (package data) with autoescape on, so names and paths are escaped by Jinja2, not by
hand. The page embeds its images as base64 PNGs (widths read with Pillow) and its CSS inline, so the one file can be
mailed, attached to a CI job or opened from anywhere without the PNGs beside it.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from posttrain.evaluation.store import ResultRecord, ResultsStore
from posttrain.report import DEFAULT_CURVES, _plt, plot_curves
from posttrain.runs import RunDir, write_atomic

MISSING = "–"
ACCURACY_PNG = "leaderboard_accuracy.png"
# Run dirs are `runs/<name>/` or, for multi-stage runs such as the quickstart, `runs/<name>/<stage>/`.
RUN_DEPTH = 2


@dataclass
class Row:
    """One model's line of the table."""

    label: str
    model: str
    cells: dict[str, ResultRecord] = field(default_factory=dict)  # benchmark -> newest record with a headline value

    @property
    def mean(self) -> float:
        """Mean accuracy over the accuracy benchmarks the model has; a model with score benchmarks only (they are
        on their scorers' own scales, so they are never averaged with accuracies) is ranked by its mean score."""
        accs = [_accuracy(r) for r in self.cells.values() if kind_of(r) == "accuracy"]
        values = accs or [_accuracy(r) for r in self.cells.values()]
        return sum(values) / len(values)

    @property
    def n_accuracy(self) -> int:
        return sum(kind_of(r) == "accuracy" for r in self.cells.values())


@dataclass
class Board:
    benchmarks: list[str]
    rows: list[Row]  # best mean accuracy first
    best: dict[str, float]  # benchmark -> best value in that column
    kinds: dict[str, str] = field(default_factory=dict)  # benchmark -> "accuracy" or "score"
    metrics: dict[str, str] = field(default_factory=dict)  # benchmark -> its headline metric: accuracy, avg@K, score

    def kind(self, benchmark: str) -> str:
        return self.kinds.get(benchmark, "accuracy")

    @property
    def n_accuracy(self) -> int:
        return sum(self.kind(b) == "accuracy" for b in self.benchmarks)

    def metric(self, benchmark: str) -> str:
        return self.metrics.get(benchmark, "score" if self.kind(benchmark) == "score" else "accuracy")

    def header(self, benchmark: str) -> str:
        """A column's heading: score columns say so (their numbers are not accuracies), and so do avg@K columns."""
        metric = self.metric(benchmark)
        return benchmark if metric == "accuracy" else f"{benchmark} ({metric})"


@dataclass
class RunCurves:
    name: str  # the run dir relative to runs_dir, e.g. "quickstart/grpo"
    png: Path
    metrics: list[str]


def write_leaderboard(
    store: ResultsStore,
    out_dir: Path,
    runs_dir: Path | None = Path("runs"),
    curves_for: Callable[[Path], Sequence[str] | None] | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """Write `out_dir/leaderboard.md` and a self-contained `out_dir/leaderboard.html` (plus the PNGs the markdown
    links to) from the newest result per model × benchmark in `store` and the curves of the runs under `runs_dir`.

    Returns (markdown path, html path). An empty store and no runs still give two valid pages that say so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    board = build_board(store.latest())
    accuracy_png = out_dir / ACCURACY_PNG
    if board.rows:
        plot_accuracy_panels(board, accuracy_png)
    curves = plot_run_curves(runs_dir, out_dir, curves_for) if runs_dir is not None else []
    header = _Header(
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        store=str(store.path),
        n_latest=sum(len(r.cells) for r in board.rows),
        n_stored=len(store.query()),
        reproduce=f"posttrain leaderboard --store {store.path} --out {out_dir}"
        + (f" --runs {runs_dir}" if runs_dir is not None else ""),
        runs_dir=str(runs_dir) if runs_dir is not None else None,
    )
    md_path, html_path = out_dir / "leaderboard.md", out_dir / "leaderboard.html"
    write_atomic(md_path, render_markdown(board, curves, header, accuracy_png if board.rows else None))
    write_atomic(html_path, render_html(board, curves, header, accuracy_png if board.rows else None))
    return md_path, html_path


def build_board(records: list[ResultRecord]) -> Board:
    """Group the newest records into rows by model; a record without an accuracy leaves its cell empty."""
    by_model: dict[str, Row] = {}
    for rec in records:
        if not _has_accuracy(rec):
            continue
        row = by_model.setdefault(rec.model, Row(label=rec.model_label or rec.model, model=rec.model))
        row.cells[rec.benchmark] = rec
    rows = list(by_model.values())
    _disambiguate_labels(rows)
    # Mean over the benchmarks a model has: the table shows how many that is, so a partial row isn't mistaken for
    # a full one.
    # Models with accuracy benchmarks first (by mean accuracy), then score-only models (by mean score).
    rows.sort(key=lambda r: (r.n_accuracy == 0, -r.mean, r.label))
    benchmarks = sorted({b for r in rows for b in r.cells})
    best = {b: max(_accuracy(r.cells[b]) for r in rows if b in r.cells) for b in benchmarks}
    firsts = {b: next(r.cells[b] for r in rows if b in r.cells) for b in benchmarks}
    kinds = {b: kind_of(rec) for b, rec in firsts.items()}
    metrics = {b: _headline_key(rec) for b, rec in firsts.items()}
    return Board(benchmarks=benchmarks, rows=rows, best=best, kinds=kinds, metrics=metrics)


def kind_of(rec: ResultRecord) -> str:
    """ "score" for a record whose headline metric is a mean score (diffusion benchmarks store `score`; records
    written before that stored it as `accuracy` beside `score_mean`), else "accuracy"."""
    return "score" if "score" in rec.metrics or "score_mean" in rec.metrics else "accuracy"


_AVG_AT_K = re.compile(r"avg@\d+")


def _headline_key(rec: ResultRecord) -> str:
    """What a cell shows: `score` (diffusion), else `avg@K` when the benchmark reports it (K samples per prompt, the
    same value as its accuracy, named as papers report it; its stderr is `avg@K_stderr`), else `accuracy`."""
    if "score" in rec.metrics:
        return "score"
    return next((key for key in sorted(rec.metrics) if _AVG_AT_K.fullmatch(key)), "accuracy")


def _has_accuracy(rec: ResultRecord) -> bool:
    value = rec.metrics.get(_headline_key(rec))
    return isinstance(value, (int, float)) and not math.isnan(value)


def _accuracy(rec: ResultRecord) -> float:
    """The record's headline value: its accuracy, or its mean score."""
    return float(rec.metrics[_headline_key(rec)])


def _stderr(rec: ResultRecord) -> float | None:
    value = rec.metrics.get(f"{_headline_key(rec)}_stderr")
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def _disambiguate_labels(rows: list[Row]) -> None:
    # Two checkpoints of one base model are easily given the same --label; two rows that read alike would be
    # worse than a long label, so those fall back to the model path.
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    for row in rows:
        if counts[row.label] > 1:
            row.label = f"{row.label} ({row.model})"


def _is_best(board: Board, benchmark: str, rec: ResultRecord) -> bool:
    # Ties are all marked: at the precision shown they're indistinguishable anyway.
    return _accuracy(rec) >= board.best[benchmark] - 1e-12


def _cell_text(rec: ResultRecord) -> str:
    err = _stderr(rec)
    return f"{_accuracy(rec):.3f}" + (f" ± {err:.3f}" if err is not None else "")


def _mean_text(board: Board, row: Row) -> str:
    if row.n_accuracy == 0:  # a score-only model: its mean score, labelled as such
        return f"{row.mean:.3f} (score)"
    partial = row.n_accuracy < board.n_accuracy
    return f"{row.mean:.3f}" + (f" ({row.n_accuracy}/{board.n_accuracy})" if partial else "")


# ---------------------------------------------------------------------------------------------------------- plots


def plot_accuracy_panels(board: Board, out: Path) -> None:
    """One horizontal-bar panel per benchmark (models top to bottom in table order, error bars = stderr).

    Horizontal bars keep long model names readable; sharing the y axis puts the names once per panel row.
    """
    plt = _plt()
    n_bench = len(board.benchmarks)
    # At most 3 panels a row, spread evenly (4 benchmarks read better as 2 × 2 than as 3 + 1).
    grid_rows = math.ceil(n_bench / 3)
    cols = math.ceil(n_bench / grid_rows)
    labels = [textwrap.fill(r.label, 28, break_on_hyphens=True) for r in board.rows]
    label_lines = max(lab.count("\n") + 1 for lab in labels)
    row_height = 0.28 + 0.16 * label_lines
    fig, axes = plt.subplots(
        grid_rows, cols, figsize=(2.0 + 3.6 * cols, grid_rows * (0.9 + row_height * len(board.rows))),
        sharey=True, squeeze=False,
    )  # fmt: skip
    ys = list(range(len(board.rows)))
    for i, bench in enumerate(board.benchmarks):
        ax = axes[i // cols][i % cols]
        values, errors, colors = [], [], []
        for row in board.rows:
            rec = row.cells.get(bench)
            values.append(_accuracy(rec) if rec else 0.0)
            errors.append((_stderr(rec) or 0.0) if rec else 0.0)
            colors.append("#2b6cb0" if rec and _is_best(board, bench, rec) else "#9bb8d8")
        bars = ax.barh(ys, values, xerr=errors, color=colors, error_kw={"elinewidth": 1, "capsize": 2})
        texts = [f"{_accuracy(row.cells[bench]):.3f}" if bench in row.cells else f"{MISSING} not run"
                 for row in board.rows]  # fmt: skip
        if board.kind(bench) == "score":  # a scorer's own scale: the axis follows the values
            top = max([v + e for v, e in zip(values, errors)] + [1e-9])
            ax.bar_label(bars, labels=texts, fontsize=8, padding=3)
            ax.set_xlim(min(0.0, min(values)), top * 1.25)
            ax.set_xlabel("score (mean, ± stderr)", fontsize=9)
        else:
            ax.bar_label(bars, labels=texts, fontsize=8, padding=3 + 40 * max(errors))
            ax.set_xlim(0, 1.18)  # room for the value labels past 1.0
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
            ax.set_xlabel(board.metric(bench), fontsize=9)
        ax.set_title(board.header(bench), fontsize=11)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=9)
    axes[0][0].set_yticks(ys, labels)
    axes[0][0].invert_yaxis()  # best model on top, as in the table
    for j in range(n_bench, grid_rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)  # the dpi plot_curves uses, so both kinds of figure show text at one size
    plt.close(fig)


def find_run_dirs(runs_dir: Path) -> list[Path]:
    """Dirs at most RUN_DEPTH levels under `runs_dir` that hold a metrics.jsonl, sorted by path."""
    if not runs_dir.is_dir():
        return []
    found = []
    for depth in range(1, RUN_DEPTH + 1):
        pattern = "/".join(["*"] * depth) + "/metrics.jsonl"
        found += [p.parent for p in runs_dir.glob(pattern) if p.is_file()]
    return sorted(set(found))


def plot_run_curves(
    runs_dir: Path, out_dir: Path, curves_for: Callable[[Path], Sequence[str] | None] | None = None
) -> list[RunCurves]:
    """Plot each run's training curves and held-out accuracies (one PNG per run); runs with none are skipped.

    `curves_for(run_dir)` names a run's training curves (the CLI passes the trainer's own, read from the run's
    resolved recipe); without it, or when it returns None, DEFAULT_CURVES."""
    curves = []
    for run_path in find_run_dirs(Path(runs_dir)):
        name = run_path.relative_to(runs_dir).as_posix()
        keys = (curves_for(run_path) if curves_for else None) or DEFAULT_CURVES
        records = [r for r in RunDir(run_path).read_metrics() if _plottable(r, keys)]
        png = out_dir / f"curves_{_slug(name)}.png"
        drawn = plot_curves(records, png, name, keys)
        if drawn:
            curves.append(RunCurves(name=name, png=png, metrics=drawn))
    return curves


def _plottable(record: dict, curves: Sequence[str] = DEFAULT_CURVES) -> bool:
    # plot_curves puts every point at int(step); a record without a numeric step (a hand-written note, a line
    # from another tool) has no place on the x axis.
    step = record.get("step")
    return isinstance(step, (int, float)) and not isinstance(step, bool) and any(
        k in curves or k.startswith("eval/") for k in record
    )  # fmt: skip


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


# ------------------------------------------------------------------------------------------------------ rendering


@dataclass
class _Header:
    generated: str
    store: str
    n_latest: int
    n_stored: int
    reproduce: str
    runs_dir: str | None


def _summary(header: _Header) -> str:
    return (
        f"{header.n_latest} results (newest per model × benchmark, of {header.n_stored} stored) "
        f"from `{header.store}`, generated {header.generated}."
    )


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(board: Board, curves: list[RunCurves], header: _Header, accuracy_png: Path | None) -> str:
    lines = ["# Leaderboard", "", _summary(header), ""]
    if not board.rows:
        lines += ["No results yet: run `posttrain eval --model ... --suite ...` to add some.", ""]
    else:
        lines += [
            "Accuracy ± standard error (columns marked (avg@K): the mean over prompts of the share of K samples "
            "correct ± its standard error over prompts; columns marked (score): a mean score on the scorer's own "
            "scale ± its standard error); **bold** is the best per benchmark; – means not evaluated. Rows are sorted by mean "
            "accuracy over the accuracy benchmarks each model has (how many, when not all, in brackets); scores are "
            "never averaged with accuracies.",
            "",
            "| model | " + " | ".join(_md_escape(board.header(b)) for b in board.benchmarks) + " | mean |",
            "|---|" + "---|" * (len(board.benchmarks) + 1),
        ]
        for row in board.rows:
            cells = []
            for bench in board.benchmarks:
                rec = row.cells.get(bench)
                if rec is None:
                    cells.append(MISSING)
                else:
                    text = _cell_text(rec)
                    cells.append(f"**{text}**" if _is_best(board, bench, rec) else text)
            lines.append(f"| {_md_escape(row.label)} | " + " | ".join(cells) + f" | {_mean_text(board, row)} |")
        lines.append("")
        if accuracy_png is not None:
            lines += [f"![accuracy per benchmark]({accuracy_png.name})", ""]
    lines += ["## Training curves", ""]
    if curves:
        for run in curves:
            lines += [f"### {run.name}", "", f"![{run.name}]({run.png.name}) ({', '.join(run.metrics)})", ""]
    else:
        lines += [_no_curves_text(header), ""]
    lines += ["---", "", f"Reproduce: `{header.reproduce}`", ""]
    return "\n".join(lines)


def _no_curves_text(header: _Header) -> str:
    if header.runs_dir is None:
        return "No run dirs given."
    return f"No run under `{header.runs_dir}` has reward, loss or held-out accuracy in its metrics.jsonl."


# Figures are drawn at 110 dpi; shown at 3/4 of their pixel width every figure's text has the same size on the page
# (a two-panel curve figure is not blown up to the width of a three-panel one) and stays sharp on HiDPI screens.
_IMG_SCALE = 0.75


@functools.cache
def _html_template() -> jinja2.Template:
    # Autoescape on: model and benchmark names, run names and paths come from users and are escaped by Jinja2.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("posttrain.evaluation", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("leaderboard.html.j2")


def _img(path: Path, alt: str) -> dict[str, object]:
    from PIL import Image

    with Image.open(path) as image:
        width = int(image.size[0] * _IMG_SCALE)
    return {"alt": alt, "width": width, "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def _html_cells(board: Board, row: Row) -> list[dict[str, str]]:
    cells = []
    for bench in board.benchmarks:
        rec = row.cells.get(bench)
        if rec is None:
            cells.append({"css_class": "missing", "title": f"{bench} not evaluated", "text": MISSING})
        else:
            css_class = "best" if _is_best(board, bench, rec) else ""
            cells.append({"css_class": css_class, "title": _cell_title(rec), "text": _cell_text(rec)})
    return cells


def render_html(board: Board, curves: list[RunCurves], header: _Header, accuracy_png: Path | None) -> str:
    """The page, from templates/leaderboard.html.j2: everything passed to the template is plain text."""
    rows = [
        {"label": row.label, "model": row.model, "cells": _html_cells(board, row), "mean": _mean_text(board, row)}
        for row in board.rows
    ]
    return _html_template().render(
        summary=_summary(header),
        headings=[board.header(b) for b in board.benchmarks],
        rows=rows,
        accuracy_image=_img(accuracy_png, "accuracy per benchmark") if accuracy_png is not None else None,
        curves=[{"name": run.name, "image": _img(run.png, f"training curves of {run.name}")} for run in curves],
        no_curves=_no_curves_text(header),
        reproduce=header.reproduce,
    )


def _cell_title(rec: ResultRecord) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.created))
    bits = [f"n={rec.n}"]
    bits += [f"{key} {value:.3f}" for key, value in rec.metrics.items()
             if key.startswith("pass@") and isinstance(value, (int, float))]  # fmt: skip
    if rec.suite:
        bits.append(f"suite {rec.suite}" + (f" v{rec.suite_version}" if rec.suite_version else ""))
    bits += [f"settings {rec.settings_hash}", f"evaluated {when}"]
    return ", ".join(bits)
