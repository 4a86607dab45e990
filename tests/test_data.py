"""Data sources of every kind, column mapping, row-numbered errors, the arithmetic task, prompt templates."""

import gzip
import json
import time
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict

from posttrain.data import SCHEMAS, arithmetic_split, format_prompts, load_source, render_prompt, validate
from posttrain.data.arithmetic import drop_carry_sum, has_carry
from posttrain.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
ROWS = [{"question": "1+1?", "final": "2"}, {"question": "2+2?", "final": "4"}, {"question": "3+3?", "final": "6"}]
MAPPING = {"prompt": "question", "answer": "final"}


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def no_hub(*args, **kwargs):
    raise AssertionError("a local-looking path must not be looked up on the hub")


# --- sources ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["jsonl", "jsonl.gz", "json", "json_lines", "parquet", "csv", "saved", "saved_dict", "files_dir"]
)
def test_every_local_source_kind_loads_with_column_mapping(tmp_path, kind):
    ds = Dataset.from_list(ROWS)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "jsonl.gz":
        write_jsonl(path, ROWS, gz=True)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "json_lines":  # Dataset.to_json writes JSON Lines, and people name those files .json
        path = tmp_path / "data.json"
        ds.to_json(str(path))
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "saved":
        ds.save_to_disk(str(path))
    elif kind == "saved_dict":
        DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    else:  # a hub snapshot on disk: a folder of data files named by split
        path.mkdir()
        ds.to_parquet(str(path / "train.parquet"))
        ds.select([0]).to_parquet(str(path / "test.parquet"))
    spec = {"path": path.name, "columns": MAPPING, "schema": "prompt_answer"}
    out = load_source(spec, base_dir=tmp_path)
    assert list(out["prompt"]) == ["1+1?", "2+2?", "3+3?"]
    assert [str(a) for a in out["answer"]] == ["2", "4", "6"]
    if kind in ("saved_dict", "files_dir"):
        assert list(load_source({**spec, "split": "test"}, base_dir=tmp_path)["prompt"]) == ["1+1?"]


def test_saved_dataset_dict_without_the_split_lists_its_splits(tmp_path):
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"no split 'eval' \(splits: train\)"):
        load_source({"path": "dd", "split": "eval"}, base_dir=tmp_path)


def test_relative_path_prefers_base_dir_then_falls_back_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    write_jsonl(tmp_path / "recipes" / "d.jsonl", [{"prompt": "from base_dir"}])
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "from cwd"}])
    write_jsonl(tmp_path / "only_cwd.jsonl", [{"prompt": "from cwd"}])
    monkeypatch.chdir(tmp_path)
    assert load_source({"path": "d.jsonl"}, base_dir=tmp_path / "recipes")[0]["prompt"] == "from base_dir"
    assert load_source({"path": "only_cwd.jsonl"}, base_dir=tmp_path / "recipes")[0]["prompt"] == "from cwd"


def test_limit_and_shuffle(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": str(i), "answer": str(i)} for i in range(50)])
    out = load_source({"path": "d.jsonl", "limit": 5}, base_dir=tmp_path)
    assert list(out["prompt"]) == ["0", "1", "2", "3", "4"]
    spec = {"path": "d.jsonl", "limit": 5, "shuffle_seed": 1}
    shuffled = list(load_source(spec, base_dir=tmp_path)["prompt"])
    assert shuffled != ["0", "1", "2", "3", "4"] and len(set(shuffled)) == 5
    assert shuffled == list(load_source(spec, base_dir=tmp_path)["prompt"])
    assert shuffled != list(load_source({**spec, "shuffle_seed": 2}, base_dir=tmp_path)["prompt"])
    assert len(load_source({"path": "d.jsonl", "limit": 500}, base_dir=tmp_path)) == 50
    with pytest.raises(DataError, match="limit must be a non-negative integer, got '5'"):
        load_source({"path": "d.jsonl", "limit": "5"}, base_dir=tmp_path)


def test_column_mapping_swaps_copies_and_replaces(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "old", "problem": "p", "solution": "s", "answer": "a"}])
    swapped = load_source({"path": "d.jsonl", "columns": {"prompt": "answer", "answer": "prompt"}}, base_dir=tmp_path)
    assert swapped[0]["prompt"] == "a" and swapped[0]["answer"] == "old"
    copied = load_source(
        {"path": "d.jsonl", "columns": {"prompt": "problem", "reference": "problem"}}, base_dir=tmp_path
    )
    assert copied[0]["prompt"] == "p" and copied[0]["reference"] == "p"
    assert "problem" not in copied.column_names
    replaced = load_source({"path": "d.jsonl", "columns": {"answer": "solution"}}, base_dir=tmp_path)
    assert replaced[0]["answer"] == "s" and sorted(replaced.column_names) == ["answer", "problem", "prompt"]


def test_spec_errors_name_the_key(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(
        DataError,
        match=r"r\.yaml: data\.train: unknown key 'colums' in a data source \(did you mean 'columns'\?\); valid: path, ",
    ):
        load_source({"path": "d.jsonl", "colums": {}}, base_dir=tmp_path, origin="r.yaml: data.train")
    with pytest.raises(DataError, match=r"valid: path, config, .*schema"):
        load_source({"path": "d.jsonl", "colour": 1}, base_dir=tmp_path)
    with pytest.raises(DataError, match="exactly one of 'path'"):
        load_source({"split": "train"})
    with pytest.raises(DataError, match="exactly one of 'path'"):
        load_source({"path": "d.jsonl", "synthetic": "arithmetic"})
    with pytest.raises(DataError, match="'carry_drop' does not apply to a path source"):
        load_source({"path": "d.jsonl", "carry_drop": 0.5}, base_dir=tmp_path)
    with pytest.raises(DataError, match="'config' does not apply to a synthetic source"):
        load_source({"synthetic": "arithmetic", "config": "main"})
    with pytest.raises(DataError, match=r"unknown synthetic task 'arithmetc' \(did you mean 'arithmetic'\?\)"):
        load_source({"synthetic": "arithmetc"})
    with pytest.raises(DataError, match=r"columns\.prompt: no column 'questoin'.*columns: question, final"):
        load_source({"path": "d.jsonl", "columns": {"prompt": "questoin"}}, base_dir=tmp_path)
    with pytest.raises(DataError, match="unknown format 'gsm9k'"):
        load_source({"path": "d.jsonl", "format": "gsm9k"}, base_dir=tmp_path)


@pytest.mark.parametrize("path", ["nope.jsonl", "data/nope.parquet", "./nope", "~/nope", "/nope/x", "a/b/c"])
def test_missing_local_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, path):
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataError, match=rf"^r\.yaml: data\.eval: file not found: {path}"):
        load_source({"path": path}, base_dir=tmp_path, origin="r.yaml: data.eval")


def test_hub_id_offline_says_to_pass_a_local_path():
    start = time.monotonic()
    with pytest.raises(
        DataError,
        match=r"^r\.yaml: data\.train: could not load 'nobody/no-such-dataset' from the Hugging Face hub \(.+\); "
        r"it is not a local file either — pass a local path",
    ):
        load_source({"path": "nobody/no-such-dataset"}, origin="r.yaml: data.train")
    assert time.monotonic() - start < 10  # offline mode answers at once instead of retrying the network


@pytest.mark.parametrize("hub_id", ["openai/gsm8k", "gsm8k", "someone/Set-3.1-8B"])
def test_hub_id_forwards_config_and_split_then_applies_format(monkeypatch, hub_id):
    calls = []

    def fake_load_dataset(path, name=None, data_dir=None, split=None):
        calls.append((path, name, data_dir, split))
        return Dataset.from_list([{"question": "q", "answer": "work\n#### 1,234"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_source({"path": hub_id, "config": "main", "split": "test", "format": "gsm8k", "schema": "prompt_answer"})
    assert calls == [(hub_id, "main", None, "test")]
    assert ds[0] == {"prompt": "q", "answer": "1234", "solution": "work\n#### 1,234"}


def test_row_missing_a_field_names_file_row_and_field(tmp_path):
    rows = [{"prompt": "a", "answer": "1", "id": 1}, {"prompt": "b", "answer": "2", "id": 2}, {"prompt": "c", "id": 3}]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"^r\.yaml: data\.train \(.*bad\.jsonl\): row 3 is missing field 'answer' \(row has: prompt, id\)$",
    ):
        load_source({"path": "bad.jsonl", "schema": "prompt_answer"}, base_dir=tmp_path, origin="r.yaml: data.train")


@pytest.mark.parametrize("blank", [None, "", "   "])
def test_null_and_blank_strings_count_as_missing(blank):
    ds = Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": blank}])
    with pytest.raises(DataError, match=r"x: row 2 is missing field 'answer' \(row has: prompt\)"):
        validate(ds, "prompt_answer", "x")


def test_row_numbers_stay_line_numbers_after_shuffle_and_blank_lines(tmp_path):
    lines = [json.dumps({"prompt": str(i), "answer": str(i)}) for i in range(30)]
    lines[20] = json.dumps({"prompt": "20"})  # line 22 once the blank line below is in
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
    with pytest.raises(DataError, match="row 22 is missing field 'answer'"):
        load_source({"path": "d.jsonl", "schema": "prompt_answer", "shuffle_seed": 0}, base_dir=tmp_path)


def test_malformed_json_line_is_reported_with_its_number(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl\): line 2 is not valid JSON"):
        load_source({"path": "broken.jsonl"}, base_dir=tmp_path)
    (tmp_path / "list.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2 is not a JSON object"):
        load_source({"path": "list.jsonl"}, base_dir=tmp_path)


def test_rows_of_mixed_types_name_the_column_and_rows(tmp_path):
    write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": [2]}])
    with pytest.raises(DataError, match=r"column 'answer' is a string in row 1 but a list in row 2"):
        load_source({"path": "mixed.jsonl"}, base_dir=tmp_path)


def test_schema_errors(tmp_path):
    ds = Dataset.from_list(ROWS)
    with pytest.raises(DataError, match=r"unknown schema 'triples' \(known: prompt_answer, prompt_completion"):
        validate(ds, "triples", "x")
    with pytest.raises(
        DataError,
        match=r"^r\.yaml: data\.train: no column 'prompt' \(columns: question, final\); map one with data\.train\.columns",
    ):
        validate(ds, "prompt_answer", "r.yaml: data.train")
    with pytest.raises(DataError, match="has no rows"):
        validate(ds.select([]), "prompt_answer", "x")
    assert SCHEMAS["polar_triplet"] == ("prompt", "reference", "chosen", "rejected")
    validate(Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]), "preference", "x")


def test_gsm8k_format_on_real_rows():
    ds = load_source({"path": str(FIXTURES / "gsm8k_test_sample.jsonl"), "format": "gsm8k", "schema": "prompt_answer"})
    assert len(ds) == 20
    assert ds[0]["answer"] == "18" and ds[0]["prompt"].startswith("Janet")
    assert ds[2]["answer"] == "70000"  # "#### 70000" after a solution full of "80,000"-style numbers
    assert ds[0]["solution"].endswith("#### 18")
    assert all(a and "," not in a and a.strip() == a for a in ds["answer"])
    assert "question" not in ds.column_names


def test_gsm8k_row_without_marker_is_an_error(tmp_path):
    write_jsonl(
        tmp_path / "g.jsonl", [{"question": "q", "answer": "x\n#### 3"}, {"question": "q", "answer": "no marker"}]
    )
    with pytest.raises(DataError, match=r"g\.jsonl\): row 2: gsm8k answer has no '#### <number>' line"):
        load_source({"path": "g.jsonl", "format": "gsm8k"}, base_dir=tmp_path)


def test_math500_sample_maps_problem_to_prompt():
    spec = {"path": str(FIXTURES / "math500_test_sample.jsonl"), "columns": {"prompt": "problem"}}
    ds = load_source({**spec, "schema": "prompt_answer"})
    assert len(ds) == 20
    assert ds[0]["prompt"].startswith("Convert the point $(0,3)$")
    assert ds[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"


# --- arithmetic ---------------------------------------------------------------------------------------------------


def test_carry_helpers_by_hand():
    assert has_carry(47, 85) and has_carry(15, 15) and not has_carry(12, 34) and not has_carry(50, 60)
    assert drop_carry_sum(47, 85) == 122
    assert drop_carry_sum(12, 34) == 46
    assert drop_carry_sum(99, 99) == 188
    assert drop_carry_sum(50, 60) == 110  # the top column keeps its own carry-out
    assert drop_carry_sum(158, 267) == 315  # 3 digits: 1+2 | 5+6->1 | 8+7->5


def test_arithmetic_splits_are_disjoint_and_deterministic():
    train, ev = arithmetic_split("train", seed=3), arithmetic_split("eval", seed=3)
    assert len(train) == 6480 and len(ev) == 1620  # 90 * 90 pairs, eval_fraction 0.2
    assert len(set(train["prompt"])) == 6480 and not set(train["prompt"]) & set(ev["prompt"])
    assert train[0]["prompt"].endswith("=") and train[0]["answer"] == str(eval(train[0]["prompt"][:-1]))
    assert list(arithmetic_split("eval", n=10, seed=3)["prompt"]) == list(ev["prompt"])[:10]
    assert list(arithmetic_split("eval", n=10, seed=4)["prompt"]) != list(ev["prompt"])[:10]
    assert len(arithmetic_split("eval", digits=1)) == 16  # round(0.2 * 81)


def test_corruption_share_and_form():
    train = arithmetic_split("train", seed=0, carry_drop=0.5).to_list()
    carry = [r for r in train if r["carry"]]
    share = sum(r["corrupted"] for r in carry) / len(carry)
    assert abs(share - 0.5) < 0.05
    assert not any(r["corrupted"] for r in train if not r["carry"])
    for r in train:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert r["carry"] == has_carry(a, b) and r["answer"] == str(a + b)
        assert r["completion"] == str(drop_carry_sum(a, b) if r["corrupted"] else a + b)
    assert not any(arithmetic_split("eval", seed=0, carry_drop=1.0)["corrupted"])
    assert not any(arithmetic_split("train", seed=0)["corrupted"])


@pytest.mark.parametrize("carry_drop", [0.1, 0.9])
def test_corruption_share_tracks_carry_drop(carry_drop):
    train = arithmetic_split("train", seed=5, carry_drop=carry_drop)
    carry = [c for c, flag in zip(train["corrupted"], train["carry"]) if flag]
    assert abs(sum(carry) / len(carry) - carry_drop) < 0.05


def test_corruption_is_a_function_of_the_problem_and_independent_across_seeds():
    full = {r["prompt"]: r["corrupted"] for r in arithmetic_split("train", seed=0, carry_drop=0.5)}
    head = arithmetic_split("train", n=300, seed=0, carry_drop=0.5)
    assert all(full[p] == c for p, c in zip(head["prompt"], head["corrupted"]))
    # Seeds must not be related: about a quarter of the carry problems are corrupted under both seeds.
    other = {r["prompt"]: r["corrupted"] for r in arithmetic_split("train", seed=1, carry_drop=0.5)}
    shared = [p for p in full if p in other and has_carry(*map(int, p[:-1].split("+")))]
    both = sum(full[p] and other[p] for p in shared) / len(shared)
    assert 0.18 < both < 0.32


def test_arithmetic_option_errors():
    with pytest.raises(DataError, match="carry_drop must be in"):
        arithmetic_split("train", carry_drop=1.5)
    with pytest.raises(DataError, match="split has 1620"):
        arithmetic_split("eval", n=5000)
    with pytest.raises(DataError, match="split must be 'train' or 'eval', got 'test'"):
        arithmetic_split("test")
    with pytest.raises(DataError, match="digits must be an integer from 1 to 3"):
        arithmetic_split("train", digits=4)
    with pytest.raises(DataError, match=r"^r\.yaml: data\.train: arithmetic: n must be a positive integer"):
        load_source({"synthetic": "arithmetic", "n": 0}, origin="r.yaml: data.train")


def test_synthetic_source_passes_its_options_and_takes_the_common_steps():
    spec = {"synthetic": "arithmetic", "split": "train", "n": 50, "seed": 2, "carry_drop": 1.0, "limit": 10}
    ds = load_source({**spec, "columns": {"reference": "answer"}, "schema": "prompt_completion"})
    direct = arithmetic_split("train", n=50, seed=2, carry_drop=1.0).select(range(10))
    assert list(ds["prompt"]) == list(direct["prompt"]) and list(ds["reference"]) == list(direct["answer"])
    assert any(ds["corrupted"])


# --- templates ----------------------------------------------------------------------------------------------------


def test_format_prompts_template_and_chat():
    ds = Dataset.from_list([{"prompt": "2+2", "answer": "4"}])
    assert format_prompts(ds) is ds
    assert format_prompts(ds, template="Q: {prompt}\nA:")[0]["prompt"] == "Q: 2+2\nA:"
    assert format_prompts(ds, template="{prompt} \\boxed{{}}")[0]["prompt"] == "2+2 \\boxed{}"
    chat = format_prompts(ds, template="Q: {prompt}", system_prompt="Be brief.", chat=True)[0]["prompt"]
    assert chat == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 2+2"}]
    assert format_prompts(ds, chat=True)[0]["prompt"] == [{"role": "user", "content": "2+2"}]
    assert format_prompts(ds, system_prompt="Be brief.")[0]["prompt"] == "Be brief.\n\n2+2"
    assert format_prompts(ds, template="Q: {prompt}")[0]["answer"] == "4"


def test_format_prompts_leaves_message_lists_as_messages():
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}])
    out = format_prompts(ds, system_prompt="Be brief.")[0]["prompt"]
    assert out == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_format_prompts_template_errors_name_template_and_column():
    ds = Dataset.from_list([{"prompt": "2+2", "answer": "4"}])
    with pytest.raises(DataError, match=r"template '\{question\}' uses column 'question'.*columns: prompt, answer"):
        format_prompts(ds, template="{question}")
    with pytest.raises(DataError, match=r"positional field '\{\}'.*write literal braces doubled"):
        format_prompts(ds, template="{prompt} in \\boxed{}")
    with pytest.raises(DataError, match="not a valid format string"):
        format_prompts(ds, template="{prompt")
    with pytest.raises(DataError, match="no column 'prompt'"):
        format_prompts(Dataset.from_list([{"question": "q"}]), chat=True)


@pytest.fixture(scope="module")
def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789+=<>/ \n"))
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_render_prompt_uses_the_chat_template(char_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_prompt("plain", char_tokenizer) == "plain"
    with pytest.raises(DataError, match="no chat template.*data.chat_template: false"):
        render_prompt(messages, char_tokenizer)
    char_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>"
        "{% endif %}"
    )
    try:
        assert render_prompt(messages, char_tokenizer) == "<system>be brief<user>hi<assistant>"
        chat = format_prompts(Dataset.from_list([{"prompt": "hi"}]), chat=True)
        assert render_prompt(chat[0]["prompt"], char_tokenizer) == "<user>hi<assistant>"
    finally:
        char_tokenizer.chat_template = None


def test_dotted_column_maps_a_field_inside_a_struct_column(tmp_path):
    """verl-format data (e.g. DAPO-Math-17k) keeps the answer in reward_model.ground_truth and chat prompts."""
    import json

    from posttrain.data import load_source

    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "data_source": "math_dapo",
             "reward_model": {"style": "rule", "ground_truth": str(i + 1)}} for i in range(3)]  # fmt: skip
    path = tmp_path / "dapo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_source({"path": str(path), "columns": {"answer": "reward_model.ground_truth"},
                      "schema": "prompt_answer"})  # fmt: skip
    assert list(ds["answer"]) == ["1", "2", "3"]
    assert ds[0]["prompt"] == [{"role": "user", "content": "What is 0+1?"}]
