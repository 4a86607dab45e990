"""POLAR data building: policy pairing, provenance, one load per policy, resume after a kill, converters."""

import json
import os
import random
import subprocess
import sys

import pytest

from posttrain.data.polar import from_pairs, from_rankings, random_prefix, truncate_loops
from posttrain.errors import DataError
from posttrain.rollout.polar_pretrain import PretrainBuild, assign_pairs, build_pretrain_triplets


class FakePolicy:
    """Deterministic 'model': a sample is policy name + prompt + seed + sample index."""

    def __init__(self, name, calls, fail_after=None):
        self.name, self.calls, self.fail_after = name, calls, fail_after

    def generate(self, prompts, params):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append((self.name, tuple(prompts), params.n))
        return [[f"{self.name}|{p}|{params.seed}|{j}" for j in range(params.n)] for p in prompts]


def factory(calls, loads, fail_after=None):
    def make(policy):
        loads.append(policy)
        return FakePolicy(policy, calls, fail_after)

    return make


PROMPTS = [f"prompt {i}" for i in range(10)]


def test_pairs_are_distinct_policies_and_cover_the_pool():
    pairs = assign_pairs(600, 3, seed=0)
    assert all(a != b for a, b in pairs)
    counts = {p: pairs.count(p) for p in set(pairs)}
    assert len(counts) == 6 and min(counts.values()) > 60  # all ordered pairs, roughly uniform
    assert pairs == assign_pairs(600, 3, seed=0) and pairs != assign_pairs(600, 3, seed=1)
    with pytest.raises(DataError, match="at least two policies"):
        assign_pairs(5, 1, seed=0)


def test_build_writes_triplets_with_provenance_loading_each_policy_once(tmp_path):
    calls, loads = [], []
    build = PretrainBuild(policies=("m1", "m2", "m3"), chunk=3)
    path = build_pretrain_triplets(PROMPTS, tmp_path / "out", build, make_generator=factory(calls, loads),
                                   progress=False)  # fmt: skip
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert loads == ["m1", "m2", "m3"]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        a, b = r["policy_a"], r["policy_b"]
        assert a != b
        assert r["reference"].startswith(f"{a}|{r['prompt']}|") and r["chosen"].startswith(f"{a}|{r['prompt']}|")
        assert r["reference"] != r["chosen"]  # two samples of A, not one copied
        assert r["rejected"].startswith(f"{b}|{r['prompt']}|")
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert "| `m1` |" in card and "temperature 1.0, top-p 0.9, top-k 50" in card


def test_killed_build_resumes_where_it_stopped_and_matches_an_uninterrupted_one(tmp_path):
    build = PretrainBuild(policies=("m1", "m2", "m3"), chunk=2)
    clean = build_pretrain_triplets(PROMPTS, tmp_path / "clean", build, make_generator=factory([], []),
                                    progress=False).read_text()  # fmt: skip

    calls = []
    with pytest.raises(KeyboardInterrupt):
        build_pretrain_triplets(PROMPTS, tmp_path / "run", build, make_generator=factory(calls, [], fail_after=7),
                                progress=False)  # fmt: skip
    assert not (tmp_path / "run" / "triplets.jsonl").exists()
    done_before = list(calls)
    calls2, loads2 = [], []
    resumed = build_pretrain_triplets(PROMPTS, tmp_path / "run", build, make_generator=factory(calls2, loads2),
                                      progress=False).read_text()  # fmt: skip
    assert resumed == clean
    # Nothing generated before the kill is generated again.
    assert not set(done_before) & set(calls2)
    assert "m1" not in loads2  # a finished policy is not even loaded


def test_resume_with_other_settings_is_refused(tmp_path):
    build = PretrainBuild(policies=("m1", "m2"), chunk=4)
    build_pretrain_triplets(PROMPTS, tmp_path, build, make_generator=factory([], []), progress=False)
    other = PretrainBuild(policies=("m1", "m2"), chunk=4, top_p=1.0)
    with pytest.raises(DataError, match="different settings \\(top_p\\)"):
        build_pretrain_triplets(PROMPTS, tmp_path, other, make_generator=factory([], []), progress=False)


def test_truncate_loops_keeps_two_repeats():
    assert truncate_loops("The answer is " + "ab" * 40) == "The answer is abab"
    assert (
        truncate_loops("no loop here, just text that ends normally.") == "no loop here, just text that ends normally."
    )
    # Short natural repeats are kept ("...!!!" is not a loop worth cutting).
    assert truncate_loops("Wow!!!!") == "Wow!!!!"


def test_random_prefix_takes_whole_words():
    text = "one two three four five six"
    prefix = random_prefix(text, random.Random(0), 2, 4)
    assert text.startswith(prefix) and 2 <= len(prefix.split()) <= 4


def test_rankings_become_reference_chosen_rejected():
    rows = from_rankings([{"prompt": "p", "ranked": ["A", "B", "C"]}])
    assert rows == [{"prompt": "p", "reference": "A", "chosen": "B", "rejected": "C"}]
    four = from_rankings([{"prompt": "p", "ranked": ["A", "B", "C", "D"]}])
    assert {(r["chosen"], r["rejected"]) for r in four} == {("B", "C"), ("B", "D"), ("C", "D")}
    assert all(r["reference"] == "A" for r in four)
    with pytest.raises(DataError, match="row 2 needs 'prompt' and a best-first list 'ranked' of >= 3"):
        from_rankings([{"prompt": "p", "ranked": ["A", "B", "C"]}, {"prompt": "q", "ranked": ["A", "B"]}])


def test_pairs_need_a_reference():
    assert from_pairs([{"prompt": "p", "chosen": "c", "rejected": "r", "gold": "g"}], "gold")[0]["reference"] == "g"
    with pytest.raises(DataError, match="row 1 is missing 'reference'"):
        from_pairs([{"prompt": "p", "chosen": "c", "rejected": "r"}])


@pytest.mark.slow
def test_cli_builds_triplets_from_two_real_tiny_policies(tmp_path):
    from posttrain.models.tiny import TinySpec, save_tiny_model

    policies = [str(save_tiny_model(tmp_path / f"m{s}", TinySpec(task="markov", hidden_size=32, intermediate_size=64,
                                                                   seed=s))) for s in (0, 1)]  # fmt: skip
    (tmp_path / "prompts.txt").write_text("abc\nbcd\nhgf\naaa\n")
    cmd = [sys.executable, "-m", "posttrain", "data", "polar-pretrain", "--policies", *policies, "--prompts",
           str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "data"), "--max-new-tokens", "6"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "data" / "triplets.jsonl").read_text().splitlines()]
    card = (tmp_path / "data" / "data_card.md").read_text()
    dropped = int(card.split(" dropped because")[0].rsplit(" ", 1)[1])
    assert len(rows) + dropped == 4 and {r["policy_a"] for r in rows} <= set(policies)
    # Random tiny models often stop at once; empty samples are dropped and counted, never written.
    assert all(r["reference"].strip() and r["chosen"].strip() and r["rejected"].strip() for r in rows)
    assert "--max-new-tokens" not in done.stdout and "triplets" in done.stdout
