"""Data sources of every kind, column mapping, row-numbered errors, the arithmetic task, prompt templates."""

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from posttrain.data import arithmetic_split, format_prompts, load_source, render_prompt, validate
from posttrain.data.arithmetic import drop_carry_sum, has_carry
from posttrain.errors import DataError
from posttrain.tiny import build_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
ROWS = [{"question": "1+1?", "final": "2"}, {"question": "2+2?", "final": "4"}, {"question": "3+3?", "final": "6"}]


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "parquet", "csv", "saved", "saved_dict"])
def test_every_local_source_kind_loads_with_column_mapping(tmp_path, kind):
    ds = Dataset.from_list(ROWS)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "jsonl.gz":
        write_jsonl(path, ROWS, gz=True)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "saved":
        ds.save_to_disk(str(path))
    else:
        DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    spec = {"path": path.name, "columns": {"prompt": "question", "answer": "final"}, "schema": "prompt_answer"}
    out = load_source(spec, base_dir=tmp_path)
    assert list(out["prompt"]) == ["1+1?", "2+2?", "3+3?"]
    assert [str(a) for a in out["answer"]] == ["2", "4", "6"]
    if kind == "saved_dict":
        assert len(load_source({**spec, "split": "test"}, base_dir=tmp_path)) == 1


def test_limit_and_shuffle(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": str(i), "answer": str(i)} for i in range(50)])
    out = load_source({"path": "d.jsonl", "limit": 5}, base_dir=tmp_path)
    assert list(out["prompt"]) == ["0", "1", "2", "3", "4"]
    shuffled = load_source({"path": "d.jsonl", "limit": 5, "shuffle_seed": 1}, base_dir=tmp_path)
    assert list(shuffled["prompt"]) != ["0", "1", "2", "3", "4"]
    assert list(shuffled["prompt"]) == list(
        load_source({"path": "d.jsonl", "limit": 5, "shuffle_seed": 1}, base_dir=tmp_path)["prompt"]
    )


def test_row_missing_a_field_names_file_row_and_field(tmp_path):
    rows = [
        {"prompt": "a", "answer": "1"},
        {"prompt": "b", "answer": "2"},
        {"prompt": "c"},
        {"prompt": "d", "answer": "4"},
    ]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(
        DataError, match=r"r\.yaml: data\.train \(.*bad\.jsonl\): row 3 is missing field 'answer' \(row has: prompt\)"
    ):
        load_source({"path": "bad.jsonl", "schema": "prompt_answer"}, base_dir=tmp_path, origin="r.yaml: data.train")


def test_malformed_json_line_is_reported_with_its_number(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl\): line 2 is not valid JSON"):
        load_source({"path": "broken.jsonl"}, base_dir=tmp_path)


def test_missing_column_and_bad_spec_errors(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"columns.prompt: no column 'questoin'.*columns: question, final"):
        load_source({"path": "d.jsonl", "columns": {"prompt": "questoin"}}, base_dir=tmp_path)
    with pytest.raises(DataError, match="no column 'prompt'"):
        load_source({"path": "d.jsonl", "schema": "prompt_answer"}, base_dir=tmp_path)
    with pytest.raises(DataError, match=r"unknown key 'colums' \(did you mean 'columns'\?\)"):
        load_source({"path": "d.jsonl", "colums": {}}, base_dir=tmp_path)
    with pytest.raises(DataError, match="exactly one of 'path'"):
        load_source({"split": "train"})
    with pytest.raises(DataError, match="file not found: nope.jsonl"):
        load_source({"path": "nope.jsonl"}, base_dir=tmp_path)
    with pytest.raises(DataError, match="unknown schema"):
        validate(Dataset.from_list(ROWS), "triples", "x")


def test_hub_id_offline_says_to_pass_a_local_path():
    with pytest.raises(
        DataError, match=r"could not load 'nobody/no-such-dataset' from the Hugging Face hub.*pass a local path"
    ):
        load_source({"path": "nobody/no-such-dataset"})


def test_gsm8k_format_on_real_rows():
    ds = load_source({"path": str(FIXTURES / "gsm8k_test_sample.jsonl"), "format": "gsm8k", "schema": "prompt_answer"})
    assert len(ds) == 20
    assert ds[0]["answer"] == "18" and ds[0]["prompt"].startswith("Janet")
    assert "####" in ds[0]["solution"]
    assert all("," not in a and a.strip() == a for a in ds["answer"])


def test_gsm8k_row_without_marker_is_an_error(tmp_path):
    write_jsonl(
        tmp_path / "g.jsonl", [{"question": "q", "answer": "x\n#### 3"}, {"question": "q", "answer": "no marker"}]
    )
    with pytest.raises(DataError, match="row 2: gsm8k answer has no '#### <number>' line"):
        load_source({"path": "g.jsonl", "format": "gsm8k"}, base_dir=tmp_path)


def test_math500_sample_maps_problem_to_prompt():
    ds = load_source(
        {
            "path": str(FIXTURES / "math500_test_sample.jsonl"),
            "columns": {"prompt": "problem"},
            "schema": "prompt_answer",
        }
    )
    assert ds[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"


def test_carry_helpers_by_hand():
    assert has_carry(47, 85) and not has_carry(12, 34)
    assert drop_carry_sum(47, 85) == 122
    assert drop_carry_sum(12, 34) == 46
    assert drop_carry_sum(99, 99) == 188
    assert drop_carry_sum(50, 60) == 110  # the top column keeps its own carry-out
    assert drop_carry_sum(158, 267) == 315  # 3 digits: 1+2 | 5+6->1 | 8+7->5


def test_arithmetic_splits_are_disjoint_and_deterministic():
    train, ev = arithmetic_split("train", seed=3), arithmetic_split("eval", seed=3)
    assert len(train) + len(ev) == 8100 and len(ev) == 1620
    assert not set(train["prompt"]) & set(ev["prompt"])
    assert list(arithmetic_split("eval", n=10, seed=3)["prompt"]) == list(ev["prompt"])[:10]
    assert list(arithmetic_split("eval", n=10, seed=4)["prompt"]) != list(ev["prompt"])[:10]


def test_corruption_share_and_form():
    train = arithmetic_split("train", seed=0, carry_drop=0.5).to_list()
    carry = [r for r in train if r["carry"]]
    share = sum(r["corrupted"] for r in carry) / len(carry)
    assert abs(share - 0.5) < 0.05
    assert not any(r["corrupted"] for r in train if not r["carry"])
    for r in train[:500]:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert r["answer"] == str(a + b)
        assert r["completion"] == str(drop_carry_sum(a, b) if r["corrupted"] else a + b)
    assert not any(arithmetic_split("eval", seed=0, carry_drop=1.0)["corrupted"])
    with pytest.raises(DataError, match="carry_drop must be in"):
        arithmetic_split("train", carry_drop=1.5)
    with pytest.raises(DataError, match="split has 1620"):
        arithmetic_split("eval", n=5000)


def test_format_prompts_template_and_chat():
    ds = Dataset.from_list([{"prompt": "2+2", "answer": "4"}])
    assert format_prompts(ds, template="Q: {prompt}\nA:")[0]["prompt"] == "Q: 2+2\nA:"
    chat = format_prompts(ds, system_prompt="Be brief.", chat=True)[0]["prompt"]
    assert chat == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"}]
    with pytest.raises(DataError, match="uses column 'question'"):
        format_prompts(ds, template="{question}")


def test_render_prompt_uses_the_chat_template():
    tok = build_tokenizer("text")
    with pytest.raises(DataError, match="no chat template"):
        render_prompt([{"role": "user", "content": "hi"}], tok)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_prompt([{"role": "user", "content": "hi"}], tok) == "<user>hi<assistant>"
    assert render_prompt("plain", tok) == "plain"
