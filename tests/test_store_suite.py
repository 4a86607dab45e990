"""Suites (built-in, overridden, inline benchmarks and their errors) and the SQLite results store."""

import multiprocessing
from pathlib import Path

import pytest
import yaml

from posttrain.errors import RecipeError
from posttrain.evaluation.benchmarks import build_benchmark, split_hh_transcript
from posttrain.evaluation.store import ResultRecord, ResultsStore, StoreError, settings_hash
from posttrain.evaluation.suite import load_suite

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


def write_suite(tmp_path, benchmarks, **extra) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "version": "2", "benchmarks": benchmarks, **extra}))
    return path


def test_shipped_suites_load():
    for path in sorted((REPO / "eval" / "suites").glob("*.yaml")):
        suite = load_suite(path)
        assert suite.benchmarks, path


def test_builtin_with_overrides_and_inline(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "1+1=", "a": "2"}\n{"q": "2+2=", "a": "4"}\n')
    suite = load_suite(write_suite(tmp_path, [
        "arithmetic",
        {"use": "gsm8k", "name": "gsm8k_strict", "grader": "gsm8k_strict", "generation": {"max_new_tokens": 64}},
        {"name": "mine", "data": {"path": "d.jsonl", "columns": {"prompt": "q", "answer": "a"}}, "grader": "numeric_match",
         "metrics": ["pass@2"], "generation": {"n": 2, "temperature": 1.0}},
    ]))  # fmt: skip
    gsm = suite.benchmarks[1]
    assert gsm.grader == "gsm8k_strict" and gsm.generation["max_new_tokens"] == 64
    assert gsm.generation["stop"][0] == "Question:"  # kept from the built-in (deep merge)
    assert gsm.prompt["few_shot"] == 5
    bench = build_benchmark(suite.benchmarks[2])
    assert list(bench.rows["prompt"]) == ["1+1=", "2+2="] and bench.params.n == 2
    arith = build_benchmark(suite.benchmarks[0], limit=10)
    assert len(arith.rows) == 10 and arith.slice_column == "carry"


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        ("gsm9k", r"unknown built-in benchmark 'gsm9k' \(did you mean 'gsm8k'\?\); valid: gsm8k, "),
        ({"use": "gsm8k", "grader": "math_verfy"}, r"unknown grader 'math_verfy' \(did you mean 'math_verify'\?\)"),
        ({"use": "gsm8k", "generation": {"max_tokens": 5}}, r"unknown key 'max_tokens'"),
        ({"name": "x"}, r"missing 'data'"),
        ({"data": {"path": "x.jsonl"}}, r"needs a 'name'"),
        ({"use": "gsm8k", "metrics": ["pass@x"]}, r"unknown metric 'pass@x'"),
    ],
)
def test_bad_suites_are_explained(tmp_path, entry, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_suite(write_suite(tmp_path, [entry]))


def test_empty_suite_and_duplicates(tmp_path):
    with pytest.raises(RecipeError, match="non-empty list"):
        load_suite(write_suite(tmp_path, []))
    with pytest.raises(RecipeError, match="repeated: arithmetic"):
        load_suite(write_suite(tmp_path, ["arithmetic", "arithmetic"]))


def test_missing_answer_column_and_empty_benchmark(tmp_path):
    from posttrain.errors import DataError

    (tmp_path / "noans.jsonl").write_text('{"prompt": "1+1="}\n')
    suite = load_suite(write_suite(tmp_path, [{"name": "x", "data": {"path": "noans.jsonl"}}]))
    with pytest.raises(DataError, match="benchmark 'x'.*no column 'answer'"):
        build_benchmark(suite.benchmarks[0])


def test_gsm8k_few_shot_prompt_from_local_files():
    suite_entry = {"use": "gsm8k", "data": {"path": str(FIXTURES / "gsm8k_test_sample.jsonl"), "format": "gsm8k"},
                   "prompt": {"few_shot": 2, "few_shot_data": {"path": str(FIXTURES / "gsm8k_test_sample.jsonl"), "format": "gsm8k"}}}  # fmt: skip
    from posttrain.evaluation.suite import resolve_benchmark

    bench = build_benchmark(resolve_benchmark(suite_entry, "test"), limit=3)
    prompt = bench.rows[2]["prompt"]
    assert prompt.count("Question:") == 3 and prompt.endswith("\nAnswer:")
    assert "#### 18" in prompt  # the first shot's worked solution


def test_preference_rows_from_hh_and_plain_format(tmp_path):
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: fine"
    prompt, reply = split_hh_transcript(hh)
    assert prompt.endswith("\n\nAssistant:") and reply == " fine"
    (tmp_path / "hh.jsonl").write_text(
        '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: good", "rejected": "\\n\\nHuman: q\\n\\nAssistant: bad"}\n'
    )
    (tmp_path / "plain.jsonl").write_text('{"prompt": "q: ", "chosen": "good", "rejected": "bad"}\n')
    suite = load_suite(write_suite(tmp_path, [
        {"use": "preference_accuracy", "name": "hh", "data": {"path": "hh.jsonl"}},
        {"use": "preference_accuracy", "name": "plain", "data": {"path": "plain.jsonl"}},
    ]))  # fmt: skip
    hh_rows = build_benchmark(suite.benchmarks[0]).rows
    assert hh_rows[0]["chosen_text"].endswith("good") and hh_rows[0]["prompt"] == "\n\nHuman: q\n\nAssistant:"
    plain = build_benchmark(suite.benchmarks[1]).rows
    assert plain[0]["chosen_text"] == "q: good" and plain[0]["rejected_text"] == "q: bad"


def record(model="m", bench="b", acc=0.5, **settings) -> ResultRecord:
    return ResultRecord(model=model, model_label=model, benchmark=bench, settings={"t": 0, **settings},
                        metrics={"accuracy": acc, "accuracy_stderr": 0.01}, n=10)  # fmt: skip


def test_store_round_trip_rerun_detection_and_latest(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    first = record(acc=0.5)
    store.add(first)
    again = record(acc=0.6)
    store.add(again)
    store.add(record(acc=0.7, t=1))  # different settings
    assert again.settings_hash == first.settings_hash != record(t=1).settings_hash
    assert [r.id for r in store.previous_identical(again)] == [first.id]
    assert settings_hash({"a": 1, "b": 2}) == settings_hash({"b": 2, "a": 1})
    reopened = ResultsStore(tmp_path / "r.db")
    assert [r.metrics["accuracy"] for r in reopened.query(model="m")] == [0.5, 0.6, 0.7]
    assert [r.metrics["accuracy"] for r in reopened.latest()] == [0.7]


def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "results.db"
    path.write_text("not a database\n")
    with pytest.raises(StoreError, match="is not a SQLite database"):
        ResultsStore(path)
    assert path.read_text() == "not a database\n"


def _writer(path: str, worker: int, count: int) -> None:
    store = ResultsStore(path)
    for i in range(count):
        store.add(record(model=f"w{worker}", bench=f"b{i}", acc=i / count))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "r.db")
    ResultsStore(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = ResultsStore(path).query()
    assert len(rows) == 120
    assert sorted({r.model for r in rows}) == ["w0", "w1", "w2"]


def test_a_use_entry_naming_another_scorer_does_not_inherit_the_built_ins_scorer_options(tmp_path):
    from posttrain.evaluation.suite import load_suite

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbenchmarks:\n  - {use: hps_benchmark, name: hb_aes, scorer: {name: aesthetic, device: cpu}}\n"
                    "  - {use: hps_benchmark, name: hb_hps, scorer: {name: hpsv2, scale: raw}}\n")  # fmt: skip
    first, second = load_suite(path).benchmarks
    assert first.scorer == {"name": "aesthetic", "device": "cpu"}  # no hps_version carried over
    assert second.scorer["hps_version"] == "v2.0" and second.scorer["scale"] == "raw"  # same scorer: merged
