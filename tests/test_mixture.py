"""Mixtures: `data.train` as a list of weighted sources (datasets.interleave_datasets), their realised shares in the
run dir and report, and the errors a bad mixture gets before any model loads."""

import json

import pytest
import yaml

from posttrain.data.mixture import SOURCE_COLUMN, load_mixture, realised_shares
from posttrain.data.sources import load_source
from posttrain.errors import DataError, PosttrainError
from posttrain.registry import load_and_validate
from posttrain.runs import MIXTURE_FILE
from posttrain.train import train_recipe


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def plain(n, tag):
    return [{"prompt": f"{tag}{i}=", "completion": f"{i}"} for i in range(n)]


def mix_spec(tmp_path, weights=(3, 1), sizes=(400, 400), stopping="first_exhausted", seed=0):
    mix = [{"path": write_rows(tmp_path / f"s{i}.jsonl", plain(n, "ab"[i])), "weight": w}
           for i, (n, w) in enumerate(zip(sizes, weights, strict=True))]  # fmt: skip
    return {"mix": mix, "stopping": stopping, "seed": seed, "schema": "prompt_completion"}


def test_interleaving_follows_the_weights_is_seeded_and_counts_the_realised_shares(tmp_path):
    spec = mix_spec(tmp_path)
    rows = load_mixture(spec, base_dir=None, origin="r.yaml: data.train", load=load_source)
    again = load_mixture(spec, base_dir=None, origin="r.yaml: data.train", load=load_source)
    assert rows["prompt"] == again["prompt"]  # same seed, same order
    other = load_mixture({**spec, "seed": 1}, base_dir=None, origin="r.yaml: data.train", load=load_source)
    assert rows["prompt"] != other["prompt"]
    rows, summary = realised_shares(rows, spec, "data.train")
    assert SOURCE_COLUMN not in rows.column_names
    a, b = summary["sources"]
    # first_exhausted: the 3:1 mixture stops when source 0's 400 rows are used; ~133 of source 1's come along.
    assert a["rows"] == 400 and a["rows"] + b["rows"] == len(rows) == summary["rows"]
    assert (a["requested"], b["requested"]) == (0.75, 0.25)
    assert abs(a["realised"] - 0.75) < 0.05 and a["realised"] + b["realised"] == pytest.approx(1.0, abs=1e-3)
    assert sum(p.startswith("a") for p in rows["prompt"]) == a["rows"]


def test_all_exhausted_uses_every_row_of_every_source(tmp_path):
    spec = mix_spec(tmp_path, weights=(1, 1), sizes=(300, 60), stopping="all_exhausted")
    rows, summary = realised_shares(load_mixture(spec, base_dir=None, origin="x", load=load_source), spec, "data.train")
    assert {p for p in rows["prompt"] if p.startswith("a")} == {f"a{i}=" for i in range(300)}
    assert {p for p in rows["prompt"] if p.startswith("b")} == {f"b{i}=" for i in range(60)}  # restarted, repeated
    first, _ = realised_shares(load_mixture({**spec, "stopping": "first_exhausted"}, base_dir=None, origin="x", load=load_source), spec,
                               "data.train")  # fmt: skip
    assert len(rows) > len(first)


def test_a_two_source_mixture_trains_and_reports_its_shares(tmp_path):
    recipe = {
        "name": "mix",
        "trainer": "sft",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"task": "arithmetic", "hidden_size": 32, "intermediate_size": 64}},
        "data": {"train": [{"synthetic": "arithmetic", "split": "train", "n": 300, "weight": 2},
                           {"path": write_rows(tmp_path / "extra.jsonl", [{"prompt": f"{i}+0=", "completion": f"{i}"}
                                                                          for i in range(100)]), "weight": 1}],
                 "mixture": {"stopping": "all_exhausted"}},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 100},
    }  # fmt: skip
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train_recipe(load_and_validate(path))
    summary = json.loads((tmp_path / "run" / MIXTURE_FILE).read_text())
    assert [s["data"] for s in summary["sources"]] == ["arithmetic", str(tmp_path / "extra.jsonl")]
    assert summary["stopping"] == "all_exhausted" and summary["seed"] == 0
    assert sum(s["rows"] for s in summary["sources"]) == summary["rows"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "data.train mixture" in report and f"| {summary['sources'][1]['realised']:.3f} |" in report


def test_a_chat_source_mixed_with_a_plain_one_is_refused(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    spec = {"mix": [{"path": write_rows(tmp_path / "plain.jsonl", plain(4, "a"))},
                    {"path": write_rows(tmp_path / "chat.jsonl", chat)}], "schema": "prompt_completion"}  # fmt: skip
    with pytest.raises(DataError, match=r"data.train\[1\] \(.*chat.jsonl\) holds chat conversations .* plain text"):
        load_mixture(spec, base_dir=None, origin="data.train", load=load_source)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"weight": 0}, ["data.train[1].weight", "> 0"]),
        ({"weight": "heavy"}, ["data.train[1].weight", "heavy"]),
        ({"rows": [{"prompt": "x=", "completion": "1"}, {"prompt": "y="}]}, ["data.train[1]", "row 2", "completion"]),
        ({"path": "nowhere.jsonl"}, ["data.train[1]", "nowhere.jsonl", "not found"]),
    ],
    ids=["weight-0", "weight-text", "row-missing-field", "missing-file"],
)
def test_a_bad_source_of_a_mixture_is_named_by_its_index(tmp_path, change, words):
    second = {"path": write_rows(tmp_path / "b.jsonl", change.get("rows", plain(4, "b")))}
    second.update({k: v for k, v in change.items() if k != "rows"})
    recipe = {"name": "m", "trainer": "sft", "model": {"tiny": {"task": "arithmetic"}}, "output_dir": str(tmp_path / "r"),
              "data": {"train": [{"path": write_rows(tmp_path / "a.jsonl", plain(4, "a"))}, second]}}  # fmt: skip
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(PosttrainError) as err:
        load_and_validate(path)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_rehearsal_cuts_each_local_source_and_stands_in_for_a_hub_one_keeping_the_weights(tmp_path):
    from posttrain.rehearse import prepare_rehearsal

    local = write_rows(tmp_path / "a.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(100)])
    recipe = {"name": "m", "trainer": "grpo", "model": {"tiny": {"task": "arithmetic"}},
              "data": {"train": [{"path": local, "weight": 2}, {"path": "openai/gsm8k", "format": "gsm8k", "weight": 1}]},
              "rewards": [{"name": "numeric_match"}], "rollout": {"num_generations": 4, "max_new_tokens": 4},
              "training": {"max_steps": 10, "per_device_train_batch_size": 8}}  # fmt: skip
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(recipe))
    prepare_rehearsal(load_and_validate(path), tmp_path / "r")
    rehearsed = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())["data"]["train"]
    assert [s["weight"] for s in rehearsed] == [2, 1]
    assert rehearsed[0]["path"] == local and rehearsed[0]["limit"] <= 32
    assert rehearsed[1]["path"].startswith(str(tmp_path / "r"))  # synthetic rows written for the hub source
    load_and_validate(tmp_path / "r" / "recipe.yaml")  # the rehearsed mixture loads, both sources local now
