"""A catalogue of bad inputs, as a new user makes them: recipes, `--set` values, data files and CLI flags.

For each: the exit code, words its one-line-per-problem message must contain, no traceback, and, for recipe and
data problems, that it failed before any model or tokenizer was built (`posttrain train` runs for real here, with
model construction made to blow up) and that `--dry-run` finds it too. Reward-server requests have their own
catalogues (tests/test_reward_server.py::test_payload_of_the_wrong_shape_is_422_naming_the_field and
tests/test_reward_server.py::test_hostile_bodies_get_a_json_error_naming_the_reason), as do run dirs and
checkpoints (tests/test_run_states.py).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from tests.conftest import REPO

BASE = {
    "trainer": "grpo",
    "model": {"tiny": {"task": "arithmetic"}},
    "data": {"train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"}},
    "rewards": [{"name": "numeric_match"}],
    "rollout": {"num_generations": 4, "max_new_tokens": 8},
    "training": {"learning_rate": 1e-4, "max_steps": 2, "per_device_train_batch_size": 8},
    "eval": {"grader": "numeric_match"},
}
ROWS = [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "carry": i > 4} for i in range(10)]


def _recipe_dir(tmp_path: Path, data: dict | None = None, train_text: str | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.jsonl").write_text(
        train_text if train_text is not None else "".join(json.dumps(r) + "\n" for r in ROWS)
    )
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    path = tmp_path / "r.yaml"
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    recipe["output_dir"] = str(tmp_path / "run")
    for dotted, value in (data or {}).items():
        node = recipe
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


_DELETE = object()

# (id, changes to BASE as dotted keys, words the message must contain)
RECIPE_CASES = [
    ("negative-lr", {"training.learning_rate": -1e-4}, ["training.learning_rate", "must be > 0", "-0.0001"]),
    ("zero-lr", {"training.learning_rate": 0}, ["training.learning_rate", "must be > 0"]),
    ("batch-0", {"training.per_device_train_batch_size": 0}, ["per_device_train_batch_size", ">= 1"]),
    ("accum-0", {"training.gradient_accumulation_steps": 0}, ["gradient_accumulation_steps", ">= 1"]),
    ("epochs-0", {"training.num_train_epochs": 0, "training.max_steps": -1}, ["num_train_epochs", "> 0"]),
    ("max-steps-0", {"training.max_steps": 0}, ["training.max_steps", "-1", ">= 1"]),
    ("warmup", {"training.warmup_steps": -1}, ["training.warmup_steps", ">= 0"]),
    ("weight-decay", {"training.weight_decay": -0.1}, ["weight_decay", ">= 0"]),
    ("grad-norm", {"training.max_grad_norm": -1}, ["max_grad_norm", ">= 0"]),
    ("time-budget", {"training.time_budget_s": 0}, ["training.time_budget_s", "> 0"]),
    ("precision", {"training.precision": "fp8"}, ["training.precision", "'bf16'", "fp8"]),
    ("lr-type", {"training.learning_rate": "fast"}, ["training.learning_rate", "number", "fast"]),
    ("scheduler", {"training.lr_scheduler_type": "cosin"}, ["lr_scheduler_type", "did you mean 'cosine'"]),
    ("optim", {"training.optim": "adamw"}, ["training.optim", "adamw_torch"]),
    ("typo-key", {"training.learning_rat": 1e-4}, ["learning_rat", "did you mean 'learning_rate'"]),
    ("misplaced-beta", {"training.beta": 0.1}, ["'beta' is an algorithm option", "algorithm"]),
    ("misplaced-gens", {"training.num_generations": 4}, ["num_generations", "rollout"]),
    ("misplaced-seed", {"training.seed": 3}, ["training.seed", "elsewhere"]),
    ("loss-type", {"algorithm.loss_type": "nosuchloss"}, ["algorithm.loss_type", "nosuchloss", "dr_grpo"]),
    ("beta", {"algorithm.beta": -0.1}, ["algorithm.beta", ">= 0"]),
    ("num-iterations", {"algorithm.num_iterations": 0}, ["algorithm.num_iterations", ">= 1"]),
    ("unknown-algorithm", {"algorithm.bta": 0.1}, ["bta", "did you mean 'beta'"]),
    ("gens-1", {"rollout.num_generations": 1}, ["rollout.num_generations", ">= 2"]),
    ("gens-3", {"rollout.num_generations": 3}, ["num_generations (3) must divide the generation batch (8"]),
    ("max-new-tokens", {"rollout.max_new_tokens": -5}, ["rollout.max_new_tokens", ">= 1", "-5"]),
    ("temperature-neg", {"rollout.temperature": -1}, ["rollout.temperature", "> 0"]),
    ("temperature-0", {"rollout.temperature": 0}, ["rollout.temperature", "> 0"]),
    ("top-p-2", {"rollout.top_p": 2.0}, ["rollout.top_p", "<= 1", "2.0"]),
    ("top-p-0", {"rollout.top_p": 0}, ["rollout.top_p", "> 0"]),
    ("top-k", {"rollout.top_k": -1}, ["rollout.top_k", ">= 0"]),
    ("backend", {"rollout.backend": "tgi"}, ["rollout.backend", "'hf', 'vllm'"]),
    ("vllm-here", {"rollout.backend": "vllm"}, ["rollout.backend 'vllm' cannot run here", "rollout.backend=hf"]),
    ("tracker", {"training.report_to": ["wandbb"]}, ["training.report_to", "unknown tracker 'wandbb'", "'wandb'"]),
    ("gpu-mem", {"rollout.vllm": {"gpu_memory_utilization": 1.5}}, ["gpu_memory_utilization", "<= 1"]),
    ("every-steps", {"eval.every_steps": -3}, ["eval.every_steps", ">= 1"]),
    ("every-steps-0", {"eval.every_steps": 0}, ["eval.every_steps", ">= 1"]),
    ("eval-batch", {"eval.batch_size": 0}, ["eval.batch_size", ">= 1"]),
    ("eval-limit", {"eval.limit": 0}, ["eval.limit", ">= 1"]),
    ("slice-column", {"eval.slice_column": "nope"}, ["eval.slice_column 'nope'", "columns: prompt, answer"]),
    ("grader", {"eval.grader": "numric_match"}, ["eval.grader", "did you mean 'numeric_match'"]),
    ("suite", {"eval.suite": "nosuch.yaml"}, ["nosuch.yaml", "not found"]),
    ("trainer", {"trainer": "grop"}, ["unknown trainer 'grop'", "did you mean 'grpo'"]),
    ("no-trainer", {"trainer": _DELETE}, ["missing required key 'trainer'"]),
    ("top-level", {"trainr": "grpo"}, ["unknown key 'trainr'", "did you mean 'trainer'"]),
    ("seed", {"seed": -1}, ["'seed' must be >= 0"]),
    ("reward-name", {"rewards": [{"name": "numric_match"}]}, ["unknown reward 'numric_match'", "numeric_match"]),
    ("reward-module", {"rewards": [{"name": "no_such_module_x:score"}]}, ["cannot import module 'no_such_module_x'"]),
    ("reward-attr", {"rewards": [{"name": "json:no_such_func"}]}, ["json", "no callable 'no_such_func'"]),
    (
        "reward-kwarg",
        {"rewards": [{"name": "format", "kwargs": {"patern": "x"}}]},
        ["unknown option 'patern' in reward 'format'", "did you mean 'pattern'"],
    ),
    ("reward-weight", {"rewards": [{"name": "numeric_match", "weight": "heavy"}]}, ["rewards[0].weight", "number"]),
    ("reward-no-name", {"rewards": [{"weight": 1.0}]}, ["missing required key 'name'"]),
    ("no-rewards", {"rewards": []}, ["needs at least one entry under 'rewards'"]),
    (
        "reward-column",
        {"rewards": [{"name": "polar", "kwargs": {"model": "x"}}]},
        ["no column 'reference'", "data.train.columns"],
    ),
    ("no-model", {"model.tiny": None}, ["model needs 'path'", "'tiny'"]),
    ("two-models", {"model.path": "some/model"}, ["both 'path' and 'tiny'"]),
    ("dtype", {"model.dtype": "float8"}, ["model.dtype", "'bfloat16'"]),
    ("lora-r", {"model.lora": {"r": 0}}, ["model.lora.r", ">= 1"]),
    ("data-limit-0", {"data.train.limit": 0}, ["data.train.limit must be >= 1"]),
    ("data-key", {"data.train.pth": "x"}, ["unknown key 'pth'", "did you mean 'path'"]),
    ("data-columns", {"data.train.columns": {"prompt": "question"}}, ["no column 'question'"]),
    ("no-train-data", {"data.train": _DELETE}, ["missing 'data.train'"]),
    ("template", {"data.prompt_template": "Q: {question}\nA:"}, ["prompt_template", "question"]),
    (
        "eval-answer",
        {"data.eval": {"path": "train.jsonl", "columns": {"answer": "carry", "carry": "x"}}},
        ["data.eval"],
    ),  # fmt: skip
    # trainer: distill (its teacher a hub id: not fetched, so the checks below are the recipe's own)
    ("distill-no-teacher", {"trainer": "distill", "rewards": [], "rollout": {"max_new_tokens": 8}},
     ["algorithm.teacher is required"]),
    ("distill-beta", {"trainer": "distill", "rewards": [], "rollout": {"max_new_tokens": 8},
                      "algorithm": {"teacher": "org/teacher", "beta": 2.0}}, ["algorithm.beta must be in [0, 1]"]),
    ("distill-groups", {"trainer": "distill", "rewards": [], "algorithm": {"teacher": "org/teacher"}},
     ["rollout.num_generations", "one completion per prompt"]),
]  # fmt: skip


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.mark.parametrize(("changes", "words"), [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_fails_before_any_model_with_its_words(tmp_path, capsys, no_models, changes, words):
    path = _recipe_dir(tmp_path, changes)
    for argv in (["train", str(path), "--dry-run"], ["train", str(path)]):
        rc, text = _run(argv, capsys)
        # 3: --dry-run of a valid recipe this machine can't run (vLLM without a GPU): the plan, then why
        assert rc == (3 if changes.get("rollout.backend") == "vllm" and "--dry-run" in argv else 2), (argv, text)
        assert "Traceback" not in text
        for word in words:
            assert word in text, (argv, word, text)
        assert str(path) in text  # the file is named
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


DATA_CASES = [
    ("missing-field", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n', ["row 2 is missing field 'answer'"]),
    ("bad-json", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n', ["line 2 is not valid JSON"]),
    ("empty", "", ["has no rows"]),
    ("blank-prompt", '{"prompt": "  ", "answer": "2"}\n', ["row 1", "missing field 'prompt'"]),
    ("not-object", '["1+1=", "2"]\n', ["line 1 is not a JSON object"]),
    ("not-utf8", b'{"prompt": "\xff\xfe", "answer": "2"}\n', ["cannot read"]),
]


@pytest.mark.parametrize(("content", "words"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_named_with_its_line_before_any_model(tmp_path, capsys, no_models, content, words):
    path = _recipe_dir(tmp_path)
    train = tmp_path / "train.jsonl"
    train.write_bytes(content if isinstance(content, bytes) else content.encode())
    for argv in (["train", str(path), "--dry-run"], ["train", str(path)]):
        rc, text = _run(argv, capsys)
        assert rc == 2 and "Traceback" not in text, text
        assert str(train) in text
        for word in words:
            assert word in text, (word, text)


def _turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


CHAT = {"task": "text", "chat": True}
CHAT_CASES = [  # (id, trainer, model.tiny, data.chat_template, rows, words)
    ("no-template", "sft", {"task": "text"}, False, [{"messages": _turns(("user", "hi"), ("assistant", "yo"))}],
     ["the tokenizer has no chat template", "data.chat_template"]),
    ("unknown-role", "sft", CHAT, False, [{"messages": _turns(("user", "hi"), ("assistant", "yo"))},
                                          {"messages": _turns(("narrator", "once"), ("assistant", "yo"))}],
     ["row 2", "narrator"]),
    ("no-assistant", "sft", CHAT, False, [{"messages": _turns(("user", "hi"))}], ["row 1", "no assistant turn"]),
    ("no-content", "sft", CHAT, False, [{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}],
     ["row 1", "message 1", "'content'"]),
    ("named-template", "sft", CHAT, "qwen25", [{"messages": _turns(("user", "hi"), ("assistant", "yo"))}],
     ["data.chat_template", "did you mean 'qwen2_5'"]),
    ("no-shared-prefix", "dpo", CHAT, False,
     [{"chosen": _turns(("user", "a"), ("assistant", "b")), "rejected": _turns(("user", "z"), ("assistant", "b"))}],
     ["row 1", "share no prefix"]),
    ("prompt-unknown-role", "dpo", CHAT, False,
     [{"chosen": _turns(("user", "a"), ("critic", "no"), ("assistant", "b")),
       "rejected": _turns(("user", "a"), ("critic", "no"), ("assistant", "c"))}], ["row 1", "critic"]),
    ("unpaired-label", "kto", {"task": "arithmetic"}, False,  # plain rows, the same per-trainer shape
     [{"prompt": "1+1=", "completion": "2", "label": "yes"}, {"prompt": "1+1=", "completion": "3", "label": "no"}],
     ["row 1", "label must be true (desirable) or false (undesirable)", "'yes'"]),
]  # fmt: skip


@pytest.mark.parametrize(("trainer", "tiny", "template", "rows", "words"), [c[1:] for c in CHAT_CASES],
                         ids=[c[0] for c in CHAT_CASES])  # fmt: skip
def test_bad_chat_data_is_named_with_its_row_before_any_model(tmp_path, capsys, no_models, trainer, tiny, template,
                                                              rows, words):  # fmt: skip
    train = tmp_path / "chat.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"trainer": trainer, "model": {"tiny": tiny}, "data": {"train": {"path": "chat.jsonl"}},
              "training": {"max_steps": 2}, "output_dir": str(tmp_path / "run")}  # fmt: skip
    if template is not False:
        recipe["data"]["chat_template"] = template
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for argv in (["train", str(path), "--dry-run"], ["train", str(path)]):
        rc, text = _run(argv, capsys)
        assert rc == 2 and "Traceback" not in text, (argv, text)
        for word in words:
            assert word in text, (argv, word, text)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_file_dry_run_prints_the_plan_and_exits_3(tmp_path, capsys, no_models):
    path = _recipe_dir(tmp_path, {"data.train.path": "not_there.jsonl"})
    rc, text = _run(["train", str(path), "--dry-run"], capsys)
    assert rc == 3 and "# plan" in text and "not_there.jsonl" in text and "file not found" in text
    rc, text = _run(["train", str(path)], capsys)
    assert rc == 2 and "not_there.jsonl" in text


@pytest.mark.parametrize("report_to", ["wandb", "trackio", "mlflow", ["tensorboard"]])
def test_a_tracker_whose_package_is_missing_names_its_extra_before_any_model(tmp_path, capsys, no_models, monkeypatch,
                                                                            report_to):  # fmt: skip
    import importlib.util

    from posttrain.preflight import TRACKER_MODULES

    name = report_to if isinstance(report_to, str) else report_to[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a: None if module in TRACKER_MODULES[name] else real(module, *a))  # fmt: skip
    path = _recipe_dir(tmp_path, {"training.report_to": report_to})
    for argv, code in ((["train", str(path), "--dry-run"], 3), (["train", str(path)], 2)):  # --dry-run: plan, then why
        rc, text = _run(argv, capsys)
        assert rc == code and "Traceback" not in text, (argv, text)
        assert f"training.report_to: '{name}' needs the {name} package: pip install 'posttrain[{name}]'" in text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_every_problem_of_a_recipe_is_reported_at_once(tmp_path, capsys, no_models):
    path = _recipe_dir(
        tmp_path,
        {
            "training.learning_rate": -1,
            "training.per_device_train_batch_size": 0,
            "rollout.temperature": -1,
            "rollout.top_p": 2.0,
            "eval.every_steps": -3,
            "algorithm.loss_type": "nosuchloss",
            "eval.slice_column": "nope",
            "rewards": [{"name": "format", "kwargs": {"patern": "x"}}],
        },
    )
    rc, text = _run(["train", str(path), "--dry-run"], capsys)
    assert rc == 2
    assert "8 problems" in text
    for key in ("learning_rate", "per_device_train_batch_size", "temperature", "top_p", "every_steps", "loss_type",
                "slice_column", "patern"):  # fmt: skip
        assert key in text


def _file_cases(tmp_path: Path) -> list[tuple[list[str], list[str]]]:
    """(argv, words) for bad recipe files and bad CLI use."""
    bad_utf8 = tmp_path / "latin1.yaml"
    bad_utf8.write_bytes(b"trainer: grpo\nname: caf\xe9\n")
    not_yaml = tmp_path / "bad.yaml"
    not_yaml.write_text("trainer: grpo\n  model: [\n")
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- trainer: grpo\n")
    cycle_a, cycle_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    cycle_a.write_text("extends: b.yaml\n")
    cycle_b.write_text("extends: a.yaml\n")
    good = _recipe_dir(tmp_path / "good")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty_db = tmp_path / "empty.db"
    empty_db.write_bytes(b"")
    text_db = tmp_path / "text.db"
    text_db.write_text("hello")
    return [
        (["train", str(bad_utf8)], ["not UTF-8", "line 2"]),
        (["train", str(not_yaml)], ["not valid YAML"]),
        (["train", str(a_list)], ["must be a mapping"]),
        (["train", str(cycle_a)], ["'extends' cycle"]),
        (["train", str(tmp_path)], ["is a directory, not a recipe file"]),
        (["train", str(tmp_path / "nope.yaml")], ["recipe file not found"]),
        (["train", str(good), "--set", "learning_rate"], ["bad --set 'learning_rate'", "section.key=value"]),
        (["train", str(good), "--set", "training.learning_rate=[1"], ["not valid YAML"]),
        (["train", str(good), "--set", "rollout.top_p=7"], ["rollout.top_p", "(set with --set)"]),
        (["train", str(good), "--set", f"output_dir={a_file}"], ["output_dir is an existing file"]),
        (["train", str(good), "--set", f"output_dir={a_file}/run"], ["is an existing file"]),
        (["eval", "--model", "m", "--suite", "s.yaml", "--limit", "-3"], ["--limit", "must be >= 1, got -3"]),
        (["eval", "--model", "m", "--suite", "s.yaml", "--batch-size", "0"], ["--batch-size", "must be >= 1"]),
        (["eval", "--model", "m", "--suite", "s.yaml", "--limit", "ten"], ["--limit", "expected an integer"]),
        (["eval", "--model", "m", "--suite", "s.yaml", "--backend", "tpu"], ["invalid choice: 'tpu'"]),
        (["eval", "--suite", "s.yaml"], ["--model and --suite are required"]),
        (["launch", str(good), "--slurm", "--nodes", "0", "--gpus-per-node", "8"], ["--nodes", "must be >= 1"]),
        (["launch", str(good), "--nodes", "2", "--gpus-per-node", "8"], ["pass --slurm"]),
        (["launch", str(good), "--slurm", "--nodes", "2", "--gpus-per-node", "1", "--vllm-nodes", "2"], ["one node"]),
        (
            [
                "launch",
                str(good),
                "--dry-run",
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
                "--set",
                "rollout.num_generations=16",
            ],
            ["num_generations (16) must divide the generation batch", "1 process(es)"],
        ),  # fmt: skip
        (
            [
                "eval",
                "--model",
                str(tmp_path / "none"),
                "--suite",
                str(tmp_path / "no_suite.yaml"),
                "--store",
                str(tmp_path / "s.db"),
            ],
            ["no_suite.yaml", "not found"],
        ),  # fmt: skip
        (["leaderboard", "--store", str(empty_db), "--out", str(tmp_path / "lb")], ["empty file", "posttrain eval"]),
        (["leaderboard", "--store", str(text_db), "--out", str(tmp_path / "lb")], ["not a SQLite database"]),
        (["leaderboard", "--store", str(tmp_path / "none.db")], ["no results store yet"]),
        (["tiny-model", "--out", str(tmp_path / "t"), "--hidden-size", "0"], ["--hidden-size", "must be >= 1"]),
        (
            [
                "data",
                "polar-finetune",
                str(tmp_path / "none.jsonl"),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--from",
                "pairs",
            ],
            ["none.jsonl", "not found"],
        ),  # fmt: skip
        (
            ["data", "polar-pretrain", "--policies", "a", "b", "--prompts", "p.txt", "--out", "o", "--chunk", "0"],
            ["--chunk", "must be >= 1"],
        ),  # fmt: skip
    ]


def test_bad_files_and_flags_get_one_clear_line(tmp_path, capsys, no_models):
    for argv, words in _file_cases(tmp_path):
        try:
            rc, text = _run(argv, capsys)
        except SystemExit as exit_:  # argparse rejects a flag value: usage + one line, exit 2
            rc, text = exit_.code, capsys.readouterr().err
        assert rc == 2, (argv, text)
        assert "Traceback" not in text, (argv, text)
        for word in words:
            assert word in text, (argv, word, text)
    assert (tmp_path / "empty.db").stat().st_size == 0  # a reader never turns a wrong path into a new database


def test_the_catalogue_covers_at_least_sixty_inputs(tmp_path):
    assert len(RECIPE_CASES) + len(DATA_CASES) + len(_file_cases(tmp_path)) + 2 >= 60


def test_the_tests_this_module_cites_exist():
    cited = re.findall(r"(tests/\w+\.py)(?:::(\w+))?", __doc__)
    assert len(cited) >= 3
    for path, name in cited:
        assert (REPO / path).is_file(), f"cites {path}, which does not exist"
        if name:
            tree = ast.parse((REPO / path).read_text())
            names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert name in names, f"cites {path}::{name}, which is not a test there"
