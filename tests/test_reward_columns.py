"""Rewards declare the dataset columns they read (`reward_models.reward_info`), and that one declaration is what
validation, `--rehearse` and the trainers read: for every registered reward, a recipe whose data lacks a column the
reward reads fails `--dry-run`, naming the reward and the column."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.registry import load_and_validate
from reward_models import reward_columns, reward_info, reward_names


def _options(name: str) -> dict:
    """Values for a reward's required options (a model path, a URL) and a column for each option naming one."""
    info = reward_info(name)
    params = inspect.signature(info.func).parameters.values()
    kwargs = {p.name: "x" for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
    kwargs.update({option: f"{option}_col" for option in info.column_options})
    return kwargs


CASES = [(name, column) for name in reward_names() for column in reward_columns(name, _options(name))]


def _recipe(tmp_path: Path, reward: str, columns: list[str]) -> Path:
    rows = [{"prompt": f"{i}+{i}=", **{c: str(2 * i) for c in columns}} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "trainer": "grpo",
        "model": {"tiny": {"task": "arithmetic"}},
        "data": {"train": {"path": "train.jsonl"}},
        "rewards": [{"name": reward, "kwargs": _options(reward)}],
        "rollout": {"num_generations": 4, "max_new_tokens": 8},
        "training": {"max_steps": 1, "per_device_train_batch_size": 8},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_answer_reading_rewards_declare_it():
    # The drift issue 24 found: boxed_strict reads `answer` (as numeric_match and math_verify do) but validation
    # did not know it.
    for name in ("boxed_strict", "math_verify", "numeric_match"):
        assert reward_columns(name, {}) == ("answer",)
    assert reward_columns("polar", {}) == ("reference",)  # its option's default
    assert reward_columns("polar", {"reference_column": "gold"}) == ("gold",)
    assert reward_columns("remote", {}) == ()  # reference_column defaults to None: it sends none


@pytest.mark.parametrize(("reward", "column"), CASES, ids=[f"{r}-{c}" for r, c in CASES])
def test_validation_refuses_data_without_a_column_the_reward_reads(tmp_path, reward, column):
    # What `--dry-run` runs (registry.load_and_validate); the CLI's exit code is checked once, below.
    read = list(reward_columns(reward, _options(reward)))
    path = _recipe(tmp_path, reward, [c for c in read if c != column])
    with pytest.raises(PosttrainError) as err:
        load_and_validate(path)
    assert f"({reward}) reads the column '{column}'" in str(err.value) and "data.train has no column" in str(err.value)


@pytest.mark.parametrize("reward", sorted({r for r, _ in CASES}))
def test_validation_accepts_data_with_every_column_the_reward_reads(tmp_path, reward):
    load_and_validate(_recipe(tmp_path, reward, list(reward_columns(reward, _options(reward)))))


def test_the_dry_run_exits_2_naming_reward_and_column(tmp_path, capsys):
    path = _recipe(tmp_path, "boxed_strict", [])  # the drift issue 24 found: it passed --dry-run with exit 0
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "rewards[0] (boxed_strict) reads the column 'answer': data.train has no column 'answer'" in err, err
    assert "Traceback" not in err


def test_a_row_missing_a_read_value_is_named_with_its_line(tmp_path):
    path = _recipe(tmp_path, "boxed_strict", ["answer"])
    rows = (tmp_path / "train.jsonl").read_text().splitlines()
    rows[2] = json.dumps({"prompt": "2+2=", "answer": None})
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(PosttrainError, match="row 3 is missing field 'answer'"):
        load_and_validate(path)


def test_user_code_reads_the_columns_its_signature_requires(tmp_path, monkeypatch):
    (tmp_path / "signature_columns_reward.py").write_text(
        "def by_solution(prompts, completions, solution, scale=1.0, **columns):\n"
        "    return [scale * (c == s) for c, s in zip(completions, solution)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward_columns("signature_columns_reward:by_solution") == ("solution",)
    path = _recipe(tmp_path, "numeric_match", ["answer"])
    recipe = yaml.safe_load(path.read_text())
    recipe["rewards"] = [{"name": "signature_columns_reward:by_solution"}]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(PosttrainError, match=r"\(signature_columns_reward:by_solution\) reads the column 'solution'"):
        load_and_validate(path)
