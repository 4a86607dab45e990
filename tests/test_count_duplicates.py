"""scripts/count_duplicates.py: the repeated-prompt count the NFT 7B recipe's data claim rests on."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "count_duplicates.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("count_duplicates", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count(script, monkeypatch, capsys, path, *args) -> str:
    """The script's output for these arguments (run in-process: its main, as `python scripts/...` would)."""
    monkeypatch.setattr(sys, "argv", ["count_duplicates.py", str(path), *args])
    script.main()
    return capsys.readouterr().out


def test_counts_repeats_of_chat_prompts_in_parquet_as_dapo_math_holds_them(tmp_path, script, monkeypatch, capsys):
    from datasets import Dataset

    chat = [[{"role": "user", "content": f"problem {i}"}] for i in range(3)]
    # problem 0 three times, problem 1 twice, problem 2 once: 6 rows, 3 distinct, 3 repeats
    prompts = [chat[0], chat[1], chat[0], chat[2], chat[1], chat[0]]
    answers = [{"ground_truth": str(i % 2)} for i in range(6)]
    Dataset.from_dict({"prompt": prompts, "reward_model": answers}).to_parquet(tmp_path / "d.parquet")
    stats = json.loads(count(script, monkeypatch, capsys, tmp_path / "d.parquet", "--json"))
    assert stats == {"rows": 6, "distinct": 3, "repeats": 3, "most_copies": 3, "copies": {"1": 1, "2": 1, "3": 1}}
    nested = json.loads(count(script, monkeypatch, capsys, tmp_path / "d.parquet", "--column",
                              "reward_model.ground_truth", "--json"))  # fmt: skip
    assert (nested["distinct"], nested["repeats"]) == (2, 4)
    text = count(script, monkeypatch, capsys, tmp_path / "d.parquet")
    assert "6 rows, 3 distinct 'prompt', 3 rows repeat an earlier one; most copies of one: 3" in text
    assert "1 prompts appear 3 times" in text


@pytest.mark.parametrize(("column", "message"), [("question", "no column 'question'"),
                                                 ("prompt.text", "row 0: no field 'prompt.text'")])  # fmt: skip
def test_a_missing_column_or_field_is_named(tmp_path, script, monkeypatch, capsys, column, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(SystemExit, match=message):
        count(script, monkeypatch, capsys, tmp_path / "d.jsonl", "--column", column)
