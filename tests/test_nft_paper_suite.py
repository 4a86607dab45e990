"""eval/suites/nft_paper.yaml: the NFT paper's six math sets at its sampling settings, run on local stand-in rows
(tests/fixtures/nft_paper/, a few rows each in the hub datasets' columns); avg@k with its standard error in the
store and the leaderboard, checked against hand-computed values."""

import json
import math
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.errors import RecipeError
from posttrain.evaluation.benchmarks import build_benchmark
from posttrain.evaluation.leaderboard import write_leaderboard
from posttrain.evaluation.metrics import avg_at_k
from posttrain.evaluation.store import ResultsStore
from posttrain.evaluation.suite import load_suite, resolve_benchmark
from posttrain.evaluation.suite_runner import run_suite

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "eval" / "suites" / "nft_paper.yaml"
FIXTURES = Path(__file__).parent / "fixtures" / "nft_paper"
# suite entry -> its stand-in rows
STAND_INS = {"aime24": "aime24", "aime25": "aime25", "amc23": "amc23", "math500_nft": "math500",
             "minerva_math": "minerva_math", "olympiadbench": "olympiadbench"}  # fmt: skip
HUB = {"aime24": "HuggingFaceH4/aime_2024", "aime25": "math-ai/aime25", "amc23": "math-ai/amc23",
       "math500_nft": "HuggingFaceH4/MATH-500", "minerva_math": "math-ai/minervamath",
       "olympiadbench": "math-ai/olympiadbench"}  # fmt: skip


def local_suite(tmp_path: Path, overrides: dict[str, dict] | None = None, only: list[str] | None = None) -> Path:
    """A copy of the shipped suite whose entries read the stand-in rows (a `data: {path}` override, merged into the
    built-in's columns and split), with per-entry overrides; `only` keeps those entries."""
    raw = yaml.safe_load(SUITE.read_text())
    entries = []
    for entry in raw["benchmarks"]:
        entry = {"use": entry} if isinstance(entry, str) else dict(entry)
        name = entry.get("name", entry["use"])
        if only is not None and name not in only:
            continue
        entry["data"] = {"path": str(FIXTURES / f"{STAND_INS[name]}.jsonl")}
        entries.append({**entry, **(overrides or {}).get(name, {})})
    path = tmp_path / "nft_paper_local.yaml"
    path.write_text(yaml.safe_dump({**raw, "benchmarks": entries}))
    return path


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub read fails the test."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was read: load_dataset{args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_the_suite_holds_the_papers_settings_and_loads_without_the_hub(no_hub):
    suite = load_suite(SUITE)
    specs = {s.name: s for s in suite.benchmarks}
    assert list(specs) == list(HUB)
    for name, spec in specs.items():
        assert spec.data["path"] == HUB[name]
        gen = spec.generation
        assert (gen["temperature"], gen["top_p"], gen["max_new_tokens"]) == (0.6, 0.7, 3584), name
        assert spec.prompt["chat_template"] and "\\boxed{}" in spec.prompt["system_prompt"]
    for name in ("aime24", "aime25", "amc23"):
        assert specs[name].generation["n"] == 32 and specs[name].metrics == ["avg@32", "pass@32"]
        assert specs[name].grader == "dapo_strict"
    for name in ("math500_nft", "minerva_math", "olympiadbench"):
        assert specs[name].generation["n"] == 1 and specs[name].grader == "math_verify"


def test_avg_at_k_by_hand():
    # 3 prompts x 4 samples, 4, 1 and 0 right: shares 1, 1/4, 0.
    out = avg_at_k([[True] * 4, [True, False, False, False], [False] * 4], 4)
    mean = (1 + 0.25 + 0) / 3
    var = ((1 - mean) ** 2 + (0.25 - mean) ** 2 + mean**2) / 2  # sample variance over prompts (ddof 1)
    assert out["avg@4"] == pytest.approx(5 / 12)
    assert out["avg@4_stderr"] == pytest.approx(math.sqrt(var / 3))
    assert out["avg@4_stderr"] == pytest.approx(0.30046, abs=1e-5)
    assert avg_at_k([[True, False]], 2) == {"avg@2": 0.5, "avg@2_stderr": 0.0}
    with pytest.raises(ValueError, match="needs exactly 4 samples per prompt"):
        avg_at_k([[True] * 4, [True] * 3], 4)


def test_avg_at_k_must_match_the_samples_drawn_and_is_refused_before_any_data(no_hub):
    spec = resolve_benchmark({"use": "aime24", "generation": {"n": 4}}, "x")
    with pytest.raises(RecipeError, match=r"avg@32 averages 32 samples per prompt, but generation.n is 4"):
        build_benchmark(spec)
    with pytest.raises(RecipeError, match=r"unknown metric 'avg@x' \(accuracy, avg@K, pass@K, maj@K\)"):
        resolve_benchmark({"use": "aime24", "metrics": ["avg@x"]}, "x")


def test_stand_in_rows_become_the_papers_prompts_and_text_golds(tmp_path, no_hub):
    suite = load_suite(local_suite(tmp_path))
    built = {spec.name: build_benchmark(spec, limit=3) for spec in suite.benchmarks}
    for name, bench in built.items():
        assert len(bench.rows) == 3, name
        system, user = bench.rows[0]["prompt"]
        assert system == {"role": "system", "content": suite.benchmarks[0].prompt["system_prompt"]}
        assert user["role"] == "user" and user["content"].startswith("Stand-in")
    assert list(built["amc23"].rows["answer"]) == ["27", "2.5", "144"]  # float golds as dapo_strict compares them
    assert list(built["olympiadbench"].rows["answer"]) == ["$-3, 3$", "$\\frac{5}{6}$", "$3$, $2$"]
    assert list(built["aime24"].rows["answer"]) == ["12", "24", "14"]
    assert built["aime24"].params.n == 32 and built["aime24"].params.temperature == 0.6


class CountedGenerator:
    """Answers prompt i (by its user text) right in `right[i]` of its n samples, boxed as the paper's prompt asks."""

    def __init__(self, golds: dict[str, str], right: dict[str, int]):
        self.golds, self.right = golds, right

    def generate(self, prompts, params):
        out = []
        for messages in prompts:
            question = messages[-1]["content"]
            good, bad = f"So the answer is \\boxed{{{self.golds[question]}}}.", "So the answer is \\boxed{0}."
            out.append([good] * self.right[question] + [bad] * (params.n - self.right[question]))
        return out


def test_avg_at_k_and_its_stderr_reach_the_store_and_the_leaderboard(tmp_path, no_hub):
    rows = [json.loads(line) for line in (FIXTURES / "aime24.jsonl").read_text().splitlines()]
    golds = {r["problem"]: r["answer"] for r in rows}
    right = dict(zip(golds, [4, 1, 0]))
    path = local_suite(tmp_path, {"aime24": {"generation": {"n": 4}, "metrics": ["avg@4", "pass@4", "pass@2"]}},
                       only=["aime24"])  # fmt: skip
    store = ResultsStore(tmp_path / "r.db")
    run_suite("stand-in/model", path, store=store, samples_dir=tmp_path / "s", generator=CountedGenerator(golds, right))
    (rec,) = store.query()
    m = rec.metrics
    assert m["avg@4"] == pytest.approx(5 / 12) and m["avg@4_stderr"] == pytest.approx(0.30046, abs=1e-5)
    assert m["accuracy"] == pytest.approx(m["avg@4"]) and m["accuracy_stderr"] == pytest.approx(m["avg@4_stderr"])
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["pass@2"] == pytest.approx((1 + (1 - 3 / 6) + 0) / 3)  # c=1 of 4: 1 - C(3,2)/C(4,2)
    md, html = write_leaderboard(ResultsStore(tmp_path / "r.db", create=False), tmp_path / "board", runs_dir=None)
    text = md.read_text()
    assert "| model | aime24 (avg@4) | mean |" in text and "**0.417 ± 0.300**" in text
    assert "aime24 (avg@4)" in html.read_text() and "pass@4 0.667" in html.read_text()


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random qwen2 model with a byte tokenizer and ChatML template: the suite's chat prompts run unchanged."""
    from posttrain.models.tiny import save_family_model

    return save_family_model(tmp_path_factory.mktemp("tiny_qwen") / "model", "qwen2")[0]


def test_posttrain_eval_runs_the_suite_on_stand_in_rows_and_reports_avg_at_32(tmp_path, tiny_qwen, capsys, no_hub):
    short = {"max_new_tokens": 8}
    overrides = {name: {"generation": short} for name in STAND_INS}
    overrides["aime24"] = {"generation": short}  # n stays 32: avg@32 and pass@32 over 32 real samples
    for name in ("aime25", "amc23"):  # n cut to 2 for speed
        overrides[name] = {"generation": {**short, "n": 2}, "metrics": ["avg@2", "pass@2"]}
    path = local_suite(tmp_path, overrides)
    db, samples = str(tmp_path / "r.db"), str(tmp_path / "samples")
    args = ["eval", "--model", str(tiny_qwen), "--suite", str(path), "--limit", "2", "--store", db,
            "--samples-dir", samples, "--label", "tiny-qwen"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "avg@32" in out and "avg@32_stderr" in out and "pass@32" in out
    records = {r.benchmark: r for r in ResultsStore(db).query()}
    assert set(records) == set(STAND_INS)
    aime = records["aime24"]
    assert aime.n == 2 and {"avg@32", "avg@32_stderr", "pass@32"} <= set(aime.metrics)
    samples_rows = [json.loads(line) for line in Path(aime.samples_path).read_text().splitlines()]
    shares = [sum(s["correct"]) / 32 for s in samples_rows]
    assert [len(s["completions"]) for s in samples_rows] == [32, 32]
    assert aime.metrics["avg@32"] == pytest.approx(sum(shares) / 2)
    assert aime.metrics["avg@32_stderr"] == pytest.approx(abs(shares[0] - shares[1]) / 2)  # std/sqrt(2) of two values
    assert {"avg@2", "avg@2_stderr", "pass@2"} <= set(records["amc23"].metrics)
    assert "avg@1" not in records["minerva_math"].metrics and "accuracy_stderr" in records["minerva_math"].metrics
    assert main(["leaderboard", "--store", db, "--out", str(tmp_path / "board"), "--runs", str(tmp_path)]) == 0
    md = (tmp_path / "board" / "leaderboard.md").read_text()
    cell = f"{aime.metrics['avg@32']:.3f} ± {aime.metrics['avg@32_stderr']:.3f}"
    assert "aime24 (avg@32)" in md and "amc23 (avg@2)" in md and cell in md
