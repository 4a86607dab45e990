"""Benchmark kinds register themselves (posttrain.evaluation.kinds): a new kind is one module plus its registration,
and suite loading, the suite runner and the rehearsal hooks look it up; the stored hashes of existing benchmarks do
not move; nothing in the suite, benchmark or runner modules branches on a kind's name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from posttrain.errors import DataError, RecipeError
from posttrain.evaluation import kinds
from posttrain.evaluation.benchmarks import Benchmark, load_rows, sampling_params
from posttrain.evaluation.kinds import (
    BUILTIN_KINDS,
    FEW_SHOT_FIELDS,
    BenchmarkKind,
    RehearsalCuts,
    benchmark_kind,
    kind_names,
    register_kind,
)
from posttrain.evaluation.runner import EvalResult
from posttrain.evaluation.store import ResultsStore, settings_hash
from posttrain.evaluation.suite import BUILTIN_BENCHMARKS, load_suite, resolve_benchmark

REPO = Path(__file__).resolve().parent.parent

# --- a toy kind, as a new kind's module would define it: the mean length of the completions -------------------


def build_lengths(spec, limit):
    rows, origin = load_rows(spec, limit)
    if "prompt" not in rows.column_names:
        raise DataError(f"{origin}: length benchmarks need a 'prompt' column")
    return Benchmark(name=spec.name, rows=rows, params=sampling_params(spec), kind=spec.kind, spec=spec)


def run_lengths(bench, ctx):
    from posttrain.evaluation.metrics import mean_stderr

    prompts = list(bench.rows["prompt"])
    completions = ctx.shared_generator().generate(prompts, bench.params)
    lengths = [float(len(group[0])) for group in completions]
    mean, stderr = mean_stderr(lengths)
    samples = [{"prompt": p, "completion": g[0], "length": n} for p, g, n in zip(prompts, completions, lengths)]
    return EvalResult(name=bench.name, accuracy=mean, n=len(lengths), stderr=stderr, samples=samples, metric="score")


LENGTH = BenchmarkKind(name="length", build=build_lengths, run=run_lengths, generation_keys=("max_new_tokens",))


class EchoGenerator:
    """Completes each prompt with as many 'x' as the prompt has characters (capped by max_new_tokens)."""

    def generate(self, prompts, params):
        return [["x" * min(len(p), params.max_new_tokens)] * params.n for p in prompts]


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test (a toy kind doesn't leak into other tests)."""
    monkeypatch.setattr(kinds, "_REGISTERED", dict(kinds._REGISTERED))


def length_suite(tmp_path, **extra) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab", "abcd", "abcdefghij"]))
    entry = {"name": "lengths", "kind": "length", "data": {"path": "prompts.jsonl"},
             "generation": {"max_new_tokens": 8}, **extra}  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "benchmarks": [entry]}))
    return path


def test_a_registered_toy_kind_loads_and_runs_through_the_suite_runner(tmp_path, registry):
    from posttrain.evaluation.suite_runner import run_suite

    assert register_kind(LENGTH) is LENGTH and "length" in kind_names()
    suite = load_suite(length_suite(tmp_path))
    [spec] = suite.benchmarks
    assert spec.kind == "length" and spec.settings()["kind"] == "length"
    store = ResultsStore(tmp_path / "r.db")
    [outcome] = run_suite("some/model", suite.source, store=store, samples_dir=tmp_path / "samples",
                          generator=EchoGenerator())  # fmt: skip
    assert outcome.result.metric == "score" and outcome.result.n == 3
    assert outcome.record.metrics["score"] == pytest.approx((2 + 4 + 8) / 3)  # 10 characters capped at 8
    [row] = store.query()
    assert row.benchmark == "lengths" and row.settings_hash == settings_hash({**spec.settings(), "limit": None})
    samples = [json.loads(line) for line in Path(row.samples_path).read_text().splitlines()]
    assert [s["length"] for s in samples] == [2.0, 4.0, 8.0]


def test_a_toy_kind_validates_its_own_keys(tmp_path, registry):
    register_kind(LENGTH)
    with pytest.raises(RecipeError, match=r"generation: unknown key 'max_new_token' \(did you mean 'max_new_tokens'"):
        load_suite(length_suite(tmp_path, generation={"max_new_token": 8}))
    with pytest.raises(RecipeError, match="'scorer' and 'baseline' apply to kind: diffusion only"):
        load_suite(length_suite(tmp_path, scorer="saturation"))
    assert resolve_benchmark({"name": "g", "kind": "length", "data": {}, "grader": "any"}, "x").grader == "any"


def test_a_kind_name_is_registered_once(registry):
    register_kind(LENGTH)
    register_kind(BenchmarkKind(name="length", build=build_lengths, run=run_lengths))  # the same module's kind again
    with pytest.raises(RecipeError, match="benchmark kind 'length' is already registered"):
        register_kind(BenchmarkKind(name="length", build=load_rows, run=run_lengths))
    with pytest.raises(RecipeError, match="benchmark kind 'diffusion' is already registered"):
        register_kind(BenchmarkKind(name="diffusion", build=build_lengths, run=run_lengths))


def test_every_builtin_kind_module_registers_its_kind():
    for name, module in BUILTIN_KINDS.items():
        kind = benchmark_kind(name)
        assert kind.name == name and __import__(module, fromlist=["KIND"]).KIND is kind
    assert kind_names()[: len(BUILTIN_KINDS)] == list(BUILTIN_KINDS)


# --- an unknown kind ---------------------------------------------------------------------------------------------


def test_an_unknown_kind_names_the_nearest_and_lists_the_kinds(tmp_path):
    with pytest.raises(RecipeError) as err:
        resolve_benchmark({"name": "imgs", "kind": "difusion", "data": {}}, "s.yaml: benchmarks[0]")
    assert str(err.value) == ("s.yaml: benchmarks[0]: unknown benchmark kind 'difusion' (did you mean 'diffusion'?); "
                              "valid: generate, preference, polar, diffusion")  # fmt: skip
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"benchmarks": [{"name": "p", "kind": "preferences", "data": {"path": "x"}}]}))
    with pytest.raises(RecipeError, match=r"benchmarks\[0\]: unknown benchmark kind 'preferences' \(did you mean "
                                          r"'preference'\?\); valid: generate, "):  # fmt: skip
        load_suite(suite)
    with pytest.raises(RecipeError, match=r"unknown benchmark kind 'zzz'; valid: generate, preference, polar, "):
        benchmark_kind("zzz")


# --- stored hashes stay valid -------------------------------------------------------------------------------------

# settings_hash(spec.settings()) of every built-in benchmark, of every benchmark of the shipped suites (each entry
# resolved without a base dir, so a local path stays as written) and of three inline definitions, computed with the
# code before benchmark kinds were registered (commit 440877c: `BenchmarkSpec.settings()` branching on
# `kind == "diffusion"`), by:
#     {name: settings_hash(resolve_benchmark(entry, "x").settings()) for ...}
# Stored results are looked up by these hashes: a change here orphans every stored result of that benchmark.
BUILTIN_HASHES = {
    "gsm8k": "fb875d593ccf",
    "math500": "44f65c105fe1",
    "arithmetic": "73683802e69a",
    "preference_accuracy": "2a1030f96764",
    "polar_discrimination": "ed84d3e53960",
    "toy_colors": "53837ae27783",
    "imagereward_prompts": "c149161aff18",
    "pickapic_validation_unique": "1dabe51405b7",
    "partiprompts": "da04f6fd6f63",
    "hps_benchmark": "e96ea2490884",
    # Added with the NFT paper's evaluation (issue 27 item 3): hashes of the new built-ins as first stored.
    "aime24": "1d7eebb7e63d",
    "aime25": "63ccbf69fc72",
    "amc23": "c02e152f2a5a",
    "minerva_math": "93f5742e64d8",
    "olympiadbench": "0e7cafc01bf3",
}
SUITE_HASHES = {
    "arithmetic.yaml": {"arithmetic": "73683802e69a"},
    "diffusion_toy.yaml": {"toy_colors": "53837ae27783"},
    "local_math.yaml": {"gsm8k": "25206662a447", "math500": "f3a627ee17cb"},
    "math.yaml": {"gsm8k": "fb875d593ccf", "gsm8k_lmeval_strict": "18ca11ff3ad8", "math500": "44f65c105fe1"},
    # Added with the NFT paper's evaluation (issue 27 item 3): hashes of its entries as first stored.
    "nft_paper.yaml": {
        "aime24": "1d7eebb7e63d",
        "aime25": "63ccbf69fc72",
        "amc23": "c02e152f2a5a",
        "math500_nft": "b67e5b6d64e5",
        "minerva_math": "93f5742e64d8",
        "olympiadbench": "0e7cafc01bf3",
    },
    "polar.yaml": {"polar_markov_heldout": "ed84d3e53960"},
    "preference.yaml": {"hh_harmless": "f62c0a9d809b"},
    "seppo_paper.yaml": {
        "pickapic_validation_unique_pickscore": "1dabe51405b7",
        "pickapic_validation_unique_hps": "252a370a2044",
        "pickapic_validation_unique_imagereward": "0ef05b900df4",
        "partiprompts_pickscore": "da04f6fd6f63",
        "partiprompts_hps": "f58af11c5378",
        "partiprompts_imagereward": "19ace6c3773d",
        "hps_benchmark_pickscore": "051e657acb35",
        "hps_benchmark_hps": "e96ea2490884",
        "hps_benchmark_imagereward": "d32a86c31d14",
        # Added with the LAION aesthetic scorer (issue 27): hashes of the new entries as first stored.
        "pickapic_validation_unique_aesthetic": "6146116fc18d",
        "partiprompts_aesthetic": "ca40f5c9404a",
        "hps_benchmark_aesthetic": "af46585e1ef8",
    },
}
# Inline definitions: (entry, hash of settings(), hash of settings() with the run's limit 50 as run_suite stores it).
INLINE_HASHES = [
    ({"name": "inline_gen", "data": {"path": "x.jsonl"}, "grader": "numeric_match", "limit": 7,
      "generation": {"max_new_tokens": 8, "n": 4}, "metrics": ["pass@4"], "prompt": {"template": "Q: {prompt}\nA:"}},
     "407001bda758", "5f946faab0b0"),
    ({"name": "inline_diff", "kind": "diffusion", "data": {"prompts": ["a"]}, "scorer": {"name": "saturation"},
      "baseline": "base", "limit": 3, "generation": {"steps": 4}},
     "e1f50105f6f8", "f2df29f0ee2a"),
    ({"name": "inline_pref", "kind": "preference", "data": {"path": "p.jsonl"}, "reward_model": "rm"},
     "15a70b9153e6", "3a5ae4995991"),
]  # fmt: skip


def test_builtin_benchmark_hashes_are_unchanged():
    hashes = {name: settings_hash(resolve_benchmark(name, "x").settings()) for name in BUILTIN_BENCHMARKS}
    assert hashes == BUILTIN_HASHES


@pytest.mark.parametrize("suite", sorted(SUITE_HASHES))
def test_shipped_suite_benchmark_hashes_are_unchanged(suite):
    raw = yaml.safe_load((REPO / "eval" / "suites" / suite).read_text())
    specs = [resolve_benchmark(entry, suite) for entry in raw["benchmarks"]]
    assert {s.name: settings_hash(s.settings()) for s in specs} == SUITE_HASHES[suite]


@pytest.mark.parametrize("entry, plain, limited", INLINE_HASHES, ids=lambda v: v["name"] if isinstance(v, dict) else "")
def test_inline_benchmark_hashes_are_unchanged(entry, plain, limited):
    spec = resolve_benchmark(entry, "x")
    assert settings_hash(spec.settings()) == plain
    assert settings_hash({**spec.settings(), "limit": 50}) == limited


def test_every_shipped_suite_is_covered_by_the_hash_check():
    assert sorted(p.name for p in (REPO / "eval" / "suites").glob("*.yaml")) == sorted(SUITE_HASHES)


# --- no branching on kind names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["suite.py", "benchmarks.py", "suite_runner.py"])
def test_no_module_compares_with_a_kind_name(module):
    """`kind == "diffusion"`, `x.kind in ("preference", ...)`, `!= "generate"`: what the registry replaced."""
    names = set(BUILTIN_KINDS)
    tree = ast.parse((REPO / "posttrain" / "evaluation" / module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                consts = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
                found += [(node.lineno, c.value) for c in consts if isinstance(c, ast.Constant) and c.value in names]
    assert found == []


# --- the rehearsal hooks (what posttrain/rehearse.py's rehearse_suite and suite_data do) -----------------------


class StandIns:
    """A rehearsal's stand-in maker: synthetic and local data kept, others replaced by a file (recorded)."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, data, fields):
        self.calls.append((name, fields))
        return data if "synthetic" in data else {"path": f"/rehearsal/suite_{name}.jsonl"}


def rehearse(bench, cuts):
    kind = benchmark_kind(bench.kind)
    entry = {"name": bench.name, "kind": bench.kind, "data": kind.stand_in_data(bench, cuts), "limit": 4}
    return kind.shrink_for_rehearsal(entry, bench, cuts)


def test_text_kinds_rehearse_with_capped_tokens_and_stand_in_rows():
    stand_ins = StandIns()
    cuts = RehearsalCuts(max_new_tokens=16, stand_in_source=stand_ins, scorers_with_weights=("pickscore",))
    gsm8k = resolve_benchmark("gsm8k", "x")
    entry = rehearse(gsm8k, cuts)
    assert entry["generation"] == {**gsm8k.generation, "max_new_tokens": 16}
    assert entry["data"] == {"path": "/rehearsal/suite_gsm8k.jsonl"} and entry["limit"] == 4
    assert entry["prompt"] == {**gsm8k.prompt, "few_shot_data": {"path": "/rehearsal/suite_gsm8k_shots.jsonl"}}
    assert entry["grader"] == "math_verify" and entry["metrics"] == [] and entry["slice_column"] is None
    assert stand_ins.calls == [("gsm8k", FEW_SHOT_FIELDS), ("gsm8k_shots", FEW_SHOT_FIELDS)]
    assert cuts.synthesised == ["gsm8k", "gsm8k (few-shot examples)"]
    arithmetic = resolve_benchmark("arithmetic", "x")
    assert rehearse(arithmetic, cuts)["data"] is arithmetic.data  # synthetic data is kept
    assert stand_ins.calls[-1] == ("arithmetic", (*FEW_SHOT_FIELDS, "carry")) and len(cuts.synthesised) == 2
    rehearse(resolve_benchmark("preference_accuracy", "x"), cuts)
    assert stand_ins.calls[-1] == ("preference_accuracy", ("prompt", "chosen", "rejected"))
    rehearse(resolve_benchmark({"use": "polar_discrimination", "data": {"path": "x.jsonl"}}, "x"), cuts)
    assert stand_ins.calls[-1] == ("polar_discrimination", ("prompt", "reference", "chosen", "rejected"))
    assert benchmark_kind("generate").stand_in_fields == ("prompt", "answer", "solution")
    assert cuts.replaced_scorers == []


def test_diffusion_rehearses_two_steps_on_colour_prompts_with_the_saturation_scorer():
    cuts = RehearsalCuts(max_new_tokens=16, stand_in_source=StandIns(), scorers_with_weights=("pickscore", "hpsv2"))
    paper = resolve_benchmark("pickapic_validation_unique", "x")
    entry = rehearse(paper, cuts)
    assert entry["data"] == {"prompts": ["red", "green", "blue"], "repeat": 2}
    assert entry["generation"] == {**paper.generation, "steps": 2, "batch_size": 2, "n": 1, "dtype": "fp32"}
    assert entry["scorer"] == "saturation" and "prompt" not in entry and "grader" not in entry
    hps = rehearse(resolve_benchmark("hps_benchmark", "x"), cuts)
    assert hps["scorer"] == "saturation" and hps["data"] is not entry["data"]  # not one list aliased in the YAML
    toy = resolve_benchmark("toy_colors", "x")
    kept = rehearse(toy, cuts)
    assert kept["data"] is toy.data and kept["scorer"] == "saturation"
    assert cuts.synthesised == ["pickapic_validation_unique", "hps_benchmark"]
    assert cuts.replaced_scorers == ["pickscore", "hpsv2"]
    assert benchmark_kind("diffusion").stand_in_fields is None


def test_a_toy_kind_rehearses_with_the_text_defaults(registry):
    register_kind(LENGTH)
    stand_ins = StandIns()
    cuts = RehearsalCuts(max_new_tokens=4, stand_in_source=stand_ins)
    spec = resolve_benchmark({"name": "lengths", "kind": "length", "data": {"path": "hub/x"},
                              "generation": {"max_new_tokens": 64}}, "x")  # fmt: skip
    entry = rehearse(spec, cuts)
    assert entry["generation"] == {"max_new_tokens": 4} and stand_ins.calls == [("lengths", ("prompt",))]
