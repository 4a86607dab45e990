"""scripts/count_duplicates.py: the repeated-prompt count the NFT 7B recipe's data claim rests on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "count_duplicates.py"


def count(path, *args):
    done = subprocess.run([sys.executable, str(SCRIPT), str(path), *args], capture_output=True, text=True)
    return done


def test_counts_repeats_of_chat_prompts_in_parquet_as_dapo_math_holds_them(tmp_path):
    from datasets import Dataset

    chat = [[{"role": "user", "content": f"problem {i}"}] for i in range(3)]
    # problem 0 three times, problem 1 twice, problem 2 once: 6 rows, 3 distinct, 3 repeats
    prompts = [chat[0], chat[1], chat[0], chat[2], chat[1], chat[0]]
    answers = [{"ground_truth": str(i % 2)} for i in range(6)]
    Dataset.from_dict({"prompt": prompts, "reward_model": answers}).to_parquet(tmp_path / "d.parquet")
    done = count(tmp_path / "d.parquet", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"rows": 6, "distinct": 3, "repeats": 3, "most_copies": 3,
                                       "copies": {"1": 1, "2": 1, "3": 1}}  # fmt: skip
    nested = json.loads(count(tmp_path / "d.parquet", "--column", "reward_model.ground_truth", "--json").stdout)
    assert (nested["distinct"], nested["repeats"]) == (2, 4)
    text = count(tmp_path / "d.parquet").stdout
    assert "6 rows, 3 distinct 'prompt', 3 rows repeat an earlier one; most copies of one: 3" in text


@pytest.mark.parametrize(("column", "message"), [("question", "no column 'question'"),
                                                 ("prompt.text", "row 0: no field 'prompt.text'")])  # fmt: skip
def test_a_missing_column_or_field_is_named(tmp_path, column, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    done = count(tmp_path / "d.jsonl", "--column", column)
    assert done.returncode != 0 and message in done.stderr
