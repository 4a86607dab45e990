"""The leaderboard report: newest result per model × benchmark, best marked, self-contained HTML, curves per run."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from posttrain.evaluation.leaderboard import find_run_dirs, write_leaderboard
from posttrain.evaluation.store import ResultRecord, ResultsStore


def _record(label: str, benchmark: str, accuracy: float, stderr: float, created: float, n: int = 500) -> ResultRecord:
    return ResultRecord(
        model=f"runs/{label}/final", model_label=label, benchmark=benchmark, settings={"temperature": 0.0},
        metrics={"accuracy": accuracy, "accuracy_stderr": stderr}, n=n, suite="arithmetic", created=created,
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    """3 models × 2 benchmarks; `sft` never ran `carry`; `grpo`/`arith` has an older and a newer result."""
    s = ResultsStore(tmp_path / "r.db")
    s.add(_record("grpo", "arith", 0.500, 0.020, created=1000.0))  # stale: superseded by the next one
    s.add(_record("grpo", "arith", 0.944, 0.007, created=2000.0, n=1000))
    s.add(_record("grpo", "carry", 0.900, 0.010, created=2000.0))
    s.add(_record("sft", "arith", 0.720, 0.014, created=2000.0))
    s.add(_record("continued-sft", "arith", 0.752, 0.014, created=2000.0))
    s.add(_record("continued-sft", "carry", 0.950, 0.012, created=2000.0))
    return s


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    grpo = runs / "quickstart" / "grpo"  # two levels deep, as the quickstart lays its stages out
    grpo.mkdir(parents=True)
    rows = [{"step": s, "stage": "grpo", "reward": 0.5 + 0.1 * s, "loss": 0.01} for s in range(4)]
    rows.append({"step": 3, "stage": "grpo:after", "eval/arith/accuracy": 0.94})
    grpo.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    nothing = runs / "lr-only"  # logs no reward, loss or eval: no figure
    nothing.mkdir()
    nothing.joinpath("metrics.jsonl").write_text(json.dumps({"step": 1, "learning_rate": 1e-5}) + "\n")
    return runs


def _table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_markdown_table_uses_newest_result_marks_best_and_missing(store, runs_dir, tmp_path):
    md_path, _ = write_leaderboard(store, tmp_path / "out", runs_dir)
    md = md_path.read_text()
    assert "| model | arith | carry | mean |" in md
    rows = {r[0]: r[1:] for r in _table_rows(md)}
    assert rows["grpo"][0] == "**0.944 ± 0.007**"  # newer 0.944 wins over the older 0.500, and is best in arith
    assert "0.500" not in md
    assert rows["continued-sft"][1] == "**0.950 ± 0.012**"
    assert rows["grpo"][1] == "0.900 ± 0.010"
    assert rows["sft"][1] == "–"
    assert rows["sft"][2] == "0.720 (1/2)"  # a mean over fewer benchmarks says so
    assert "5 results (newest per model × benchmark, of 6 stored)" in md
    assert "posttrain leaderboard" in md and "--out" in md


def test_rows_sorted_by_mean_accuracy_best_first(store, runs_dir, tmp_path):
    md_path, _ = write_leaderboard(store, tmp_path / "out", runs_dir)
    # means: grpo (0.944+0.900)/2 = 0.922, continued-sft (0.752+0.950)/2 = 0.851, sft 0.720
    assert [r[0] for r in _table_rows(md_path.read_text())] == ["grpo", "continued-sft", "sft"]


def test_html_is_self_contained_with_embedded_images(store, runs_dir, tmp_path):
    _, html_path = write_leaderboard(store, tmp_path / "out", runs_dir)
    html = html_path.read_text()
    for external in ('src="http', "<script src", "<link"):
        assert external not in html
    images = re.findall(r'<img alt="[^"]*" width="(\d+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2  # the accuracy panels and the one run with curves
    for width, data in images:  # shown at 3/4 of the PNG's pixel width
        assert int(width) == int(Image.open(io.BytesIO(base64.b64decode(data))).size[0] * 0.75)
    assert 'class="best"' in html
    assert 'title="n=1000, suite arithmetic' in html  # n is in the cell's tooltip


def test_training_curves_one_figure_per_run_with_curves(store, runs_dir, tmp_path):
    out = tmp_path / "out"
    md_path, _ = write_leaderboard(store, out, runs_dir)
    md = md_path.read_text()
    assert "### quickstart/grpo" in md and "lr-only" not in md
    assert (out / "curves_quickstart_grpo.png").stat().st_size > 1000
    assert (out / "leaderboard_accuracy.png").stat().st_size > 1000
    assert find_run_dirs(runs_dir) == [runs_dir / "lr-only", runs_dir / "quickstart" / "grpo"]


def test_empty_store_and_no_runs_still_write_valid_pages(tmp_path):
    md_path, html_path = write_leaderboard(ResultsStore(tmp_path / "empty.db"), tmp_path / "out", tmp_path / "none")
    assert "No results yet" in md_path.read_text()
    html = html_path.read_text()
    assert "No results yet" in html and html.rstrip().endswith("</html>")
    assert "<table" not in html and "data:image" not in html


def test_html_escapes_untrusted_names(tmp_path):
    # Model labels and paths, benchmark names and run dir names come from users: none may inject markup.
    evil = "<script>alert('x')</script>"
    s = ResultsStore(tmp_path / "r.db")
    s.add(ResultRecord(model='runs/"q"&<b>/final', model_label=evil, benchmark='a<b>&"c"', settings={},
                       metrics={"accuracy": 0.5, "accuracy_stderr": 0.01}, n=10, created=1.0))  # fmt: skip
    run = tmp_path / "runs" / "<img src=x onerror=alert(1)>"
    run.mkdir(parents=True)
    run.joinpath("metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(3))
    )
    _, html_path = write_leaderboard(s, tmp_path / "out", tmp_path / "runs")
    html = html_path.read_text()
    assert "<script" not in html and "<b>" not in html and "<img src=x" not in html
    assert '<td class="model" title="runs/&#34;q&#34;&amp;&lt;b&gt;/final">' in html  # attribute: quotes escaped too
    assert ">&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</td>" in html
    assert "<th>a&lt;b&gt;&amp;&#34;c&#34;</th>" in html
    assert "<h3>&lt;img src=x onerror=alert(1)&gt;</h3>" in html
    assert 'alt="training curves of &lt;img src=x onerror=alert(1)&gt;"' in html


@pytest.mark.slow
def test_html_renders_in_headless_chromium(store, runs_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium binary on PATH")
    _, html_path = write_leaderboard(store, tmp_path / "out", runs_dir)
    png = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}", "--window-size=1400,2200",
         html_path.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    # At this window size a blank page is ~14 KB and the text-only empty leaderboard ~47 KB; this one (two plots)
    # is ~130 KB.
    assert png.exists() and png.stat().st_size > 80_000


def test_run_curves_draw_intervals_as_bands_not_as_curves(tmp_path):
    from posttrain.report import plot_curves

    records = [
        {"step": s, "loss": 1.0 / (s + 1), "flip_rate": 0.5, "eval/toy/score": a, "eval/toy/score_stderr": 0.01,
         "eval/toy/score_ci95_low": a - 0.02, "eval/toy/score_ci95_high": a + 0.02}
        for s, a in ((0, 0.5), (10, 0.6))
    ]  # fmt: skip
    from posttrain.registry import get_spec

    drawn = plot_curves(records, tmp_path / "curves.png", "t", get_spec("seppo").curves)  # SePPO's own curves
    assert drawn == ["eval/toy/score", "flip_rate", "loss"]  # stderr/CI go into a band, not curves of their own
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_diffusion_scores_get_a_score_column_and_are_never_averaged_with_accuracies(tmp_path):
    s = ResultsStore(tmp_path / "r.db")
    s.add(_record("grpo", "arith", 0.900, 0.010, created=1.0))
    s.add(_record("grpo", "carry", 0.700, 0.010, created=1.0))
    s.add(ResultRecord(model="runs/seppo/final", model_label="seppo", benchmark="toy_colors", settings={},
                       metrics={"score": 2.5, "score_stderr": 0.1, "win_rate": 0.8}, n=300, created=1.0))  # fmt: skip
    s.add(ResultRecord(model="runs/grpo/final", model_label="grpo", benchmark="toy_colors", settings={},
                       metrics={"score": 1.5, "score_stderr": 0.1}, n=300, created=1.0))  # fmt: skip
    md_path, html_path = write_leaderboard(s, tmp_path / "out", runs_dir=None)
    md = md_path.read_text()
    assert "| model | arith | carry | toy_colors (score) | mean |" in md
    rows = {r[0]: r[1:] for r in _table_rows(md)}
    assert rows["grpo"] == ["**0.900 ± 0.010**", "**0.700 ± 0.010**", "1.500 ± 0.100", "0.800"]  # mean of accuracies
    assert rows["seppo"] == ["–", "–", "**2.500 ± 0.100**", "2.500 (score)"]
    assert list(rows) == ["grpo", "seppo"]  # models with accuracies first, then score-only ones
    assert "<th>toy_colors (score)</th>" in html_path.read_text()


def test_run_curves_of_a_score_benchmark_draw_score_and_win_rate_not_accuracy(tmp_path):
    from posttrain.report import plot_curves

    records = [
        {"step": 0, "loss": 1.0, "eval/toy/score": 0.2, "eval/toy/score_ci95_low": 0.18, "eval/toy/score_ci95_high": 0.22},
        {"step": 9, "loss": 0.5, "eval/toy/score": 0.3, "eval/toy/score_ci95_low": 0.28,
         "eval/toy/score_ci95_high": 0.32, "eval/toy/win_rate": 0.75, "eval/toy/win_rate_stderr": 0.02,
         "eval/toy/win_rate_ci95_low": 0.71, "eval/toy/win_rate_ci95_high": 0.79, "eval/toy/baseline_score_mean": 0.2},
    ]  # fmt: skip
    drawn = plot_curves(records, tmp_path / "curves.png", "t", ("loss",))
    assert drawn == ["eval/toy/baseline_score_mean", "eval/toy/score", "eval/toy/win_rate", "loss"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
