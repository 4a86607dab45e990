"""`posttrain eval` and `posttrain leaderboard` end to end on a tiny model, and suite evaluation during training."""

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.evaluation.store import ResultsStore
from posttrain.registry import load_and_validate as load_recipe
from posttrain.runs import RunDir
from posttrain.train import train_recipe

REPO = Path(__file__).resolve().parent.parent
ARITH_SUITE = str(REPO / "eval" / "suites" / "arithmetic.yaml")


def run_eval(tmp_path, model, *extra):
    return main(["eval", "--model", str(model), "--suite", ARITH_SUITE, "--store", str(tmp_path / "r.db"),
                 "--samples-dir", str(tmp_path / "samples"), "--limit", "40", *extra])  # fmt: skip


def test_eval_stores_results_and_recognises_reruns(tmp_path, tiny_model_dir, capsys):
    assert run_eval(tmp_path, tiny_model_dir, "--label", "tiny") == 0
    assert run_eval(tmp_path, tiny_model_dir, "--label", "tiny") == 0
    out = capsys.readouterr().out
    assert "re-run #2 of identical settings" in out
    rows = ResultsStore(tmp_path / "r.db").query()
    assert [r.benchmark for r in rows] == ["arithmetic", "arithmetic"]
    assert rows[0].settings_hash == rows[1].settings_hash and rows[0].n == 40
    assert {"accuracy", "accuracy_stderr", "accuracy[carry=True]"} <= set(rows[0].metrics)
    samples = [json.loads(line) for line in Path(rows[0].samples_path).read_text().splitlines()]
    assert len(samples) == 40 and {"prompt", "completion", "extracted", "answer", "correct"} <= set(samples[0])
    assert run_eval(tmp_path, tiny_model_dir, "--label", "tiny", "--limit", "20") == 0  # other settings, new hash
    assert len({r.settings_hash for r in ResultsStore(tmp_path / "r.db").query()}) == 2


def test_leaderboard_from_the_store(tmp_path, tiny_model_dir):
    assert run_eval(tmp_path, tiny_model_dir, "--label", "tiny-a") == 0
    out = tmp_path / "reports"
    assert main(["leaderboard", "--store", str(tmp_path / "r.db"), "--out", str(out), "--runs", str(tmp_path)]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "tiny-a" in md and "arithmetic" in md
    assert "data:image/png;base64," in (out / "leaderboard.html").read_text()


def test_eval_bad_inputs_are_clear_and_keep_stored_results(tmp_path, tiny_model_dir, capsys):
    assert run_eval(tmp_path, tiny_model_dir) == 0
    assert run_eval(tmp_path, tmp_path / "no-such-model") == 2
    assert "does not exist" in capsys.readouterr().err
    bad_suite = tmp_path / "bad.yaml"
    bad_suite.write_text(yaml.safe_dump({"benchmarks": ["gsm9k"]}))
    code = main(["eval", "--model", str(tiny_model_dir), "--suite", str(bad_suite), "--store", str(tmp_path / "r.db")])
    assert code == 2 and "did you mean 'gsm8k'" in capsys.readouterr().err
    assert len(ResultsStore(tmp_path / "r.db").query()) == 1  # earlier results untouched
    not_db = tmp_path / "notes.db"
    not_db.write_text("hello")
    assert main(["eval", "--model", str(tiny_model_dir), "--suite", ARITH_SUITE, "--store", str(not_db)]) == 2
    assert "is not a SQLite database" in capsys.readouterr().err and not_db.read_text() == "hello"
    assert main(["leaderboard", "--store", str(tmp_path / "missing.db")]) == 2


def test_training_runs_the_recipe_suite_periodically(tmp_path):
    recipe = {
        "name": "sft-suite",
        "trainer": "sft",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"task": "arithmetic", "hidden_size": 32, "intermediate_size": 64}},
        "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 256}},
        "eval": {"suite": ARITH_SUITE, "every_steps": 2, "limit": 30},
        "training": {"max_steps": 4, "per_device_train_batch_size": 16, "logging_steps": 2, "save_steps": 4},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = train_recipe(load_recipe(path))
    logged = [r for r in RunDir(tmp_path / "run").read_metrics() if "eval/arithmetic/accuracy" in r]
    assert [r["step"] for r in logged] == [0, 2, 4, 4]  # before, every 2 steps, after
    assert "eval/arithmetic/accuracy[carry=True]" in result.after


@pytest.mark.parametrize("suite", sorted((REPO / "eval" / "suites").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_suites_validate(suite):
    from posttrain.evaluation.suite import load_suite

    assert load_suite(suite).benchmarks


HH_SAMPLE = Path(__file__).parent / "fixtures" / "hh_harmless_test_sample.jsonl"


def test_preference_accuracy_on_real_hh_pairs_by_hand():
    from posttrain.evaluation import evaluate_preference
    from posttrain.evaluation.benchmarks import build_benchmark
    from posttrain.evaluation.suite import resolve_benchmark

    spec = resolve_benchmark({"use": "preference_accuracy", "name": "hh", "data": {"path": str(HH_SAMPLE)}}, "test")
    bench = build_benchmark(spec)
    rows = [json.loads(line) for line in HH_SAMPLE.read_text().splitlines()]
    # A "reward model" that prefers longer transcripts: its accuracy is countable by hand.
    expected = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
    result = evaluate_preference(lambda texts: [float(len(t)) for t in texts], bench)
    assert result.n == 20 and result.accuracy == pytest.approx(expected)
    assert all(s["prompt"].endswith("\n\nAssistant:") for s in result.samples)


def test_eval_preference_suite_with_a_sequence_classifier(tmp_path, tiny_model_dir, capsys):
    suite = tmp_path / "pref.yaml"
    suite.write_text(yaml.safe_dump({"name": "pref", "benchmarks": [
        {"use": "preference_accuracy", "name": "hh_sample", "data": {"path": str(HH_SAMPLE)}}]}))  # fmt: skip
    rm_dir = tmp_path / "rm"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm_dir)
    code = main(["eval", "--model", str(rm_dir), "--suite", str(suite), "--store", str(tmp_path / "r.db"),
                 "--samples-dir", str(tmp_path / "s")])  # fmt: skip
    assert code == 0
    (row,) = ResultsStore(tmp_path / "r.db").query()
    assert row.benchmark == "hh_sample" and row.n == 20 and 0.0 <= row.metrics["accuracy"] <= 1.0
    assert "mean_margin" in row.metrics


def test_empty_benchmark_is_an_error(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"benchmarks": [{"name": "e", "data": {"path": str(tmp_path / "empty.jsonl")}}]}))
    assert main(["eval", "--model", str(tiny_model_dir), "--suite", str(suite), "--store", str(tmp_path / "r.db")]) == 2
    assert "has no rows" in capsys.readouterr().err
