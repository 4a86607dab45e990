"""`trainer: distill` (TRL DistillationTrainer): a short run brings the student's next-token distributions towards the
teacher's; the teacher is checked before any model loads (not there yet: a MachineError, like a missing model.path;
another vocabulary: refused naming both tokenizers, read from their files); its weights are in the memory plan; it
reaches TRL frozen, in eval mode and the student's dtype; its rehearsal stand-in shares the student's tokenizer; and
(slow) distilling the quickstart's GRPO model teaches a 4x smaller student the task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.errors import RecipeError
from posttrain.preflight import MachineError
from posttrain.registry import load_and_validate
from posttrain.shipped import recipes_dir
from posttrain.train import dry_run_plan, train_recipe

RECIPE = recipes_dir() / "distill" / "arithmetic.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny arithmetic teacher twice the student's width whose final norm is scaled up, so that its next-token
    distributions are peaked (a random model's are near uniform, too close to the student's to measure a change)."""
    import torch

    from posttrain.models.tiny import TinySpec, build_tiny_model

    model, tokenizer = build_tiny_model(TinySpec(hidden_size=128, intermediate_size=256, seed=1))
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
    out = tmp_path_factory.mktemp("teacher") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory) -> Path:
    """A tiny qwen2 model with the byte-level tokenizer (259 tokens): another vocabulary than the arithmetic one."""
    from posttrain.models.tiny import save_family_model

    path, _ = save_family_model(tmp_path_factory.mktemp("byte") / "model", "qwen2")
    return path


def write_recipe(tmp_path: Path, student: Path | str | None, teacher: Path | str, **sections) -> Path:
    """A small distill recipe: `student` a model dir or hub id (None: the tiny arithmetic spec)."""
    raw = {
        "name": "distill-small",
        "trainer": "distill",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(student)} if student is not None else {"tiny": {"task": "arithmetic"}},
        "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 256},
                 "eval": {"synthetic": "arithmetic", "split": "eval", "n": 32}},
        "rollout": {"max_new_tokens": 4},
        "algorithm": {"teacher": str(teacher)},
        "eval": {"name": "arithmetic", "grader": "numeric_match", "slice_column": "carry"},
        "training": {"max_steps": 30, "per_device_train_batch_size": 16, "learning_rate": 3.0e-3, "logging_steps": 5,
                     "save_steps": 100},
    }  # fmt: skip
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------- the shipped recipe, plan


def test_shipped_recipe_dry_run_states_the_teacher_the_divergence_and_the_batch(teacher_dir):
    lines = dry_run_plan(load_and_validate(RECIPE, [f"algorithm.teacher={teacher_dir}"]))
    text = "\n".join(lines)
    assert lines[0].startswith("trainer: distill")
    assert f"teacher: {teacher_dir} (local dir; 0.33M parameters, vocabulary 19), frozen in eval mode" in text
    assert "64 prompts per optimizer step per process" in text and "one completion each" in text
    assert "D = beta 1: the reverse KL(p_student || p_teacher)" in text
    assert "no reward, no reference model" in text


def test_a_teacher_not_there_yet_is_a_machine_error_and_the_dry_run_still_plans(capsys):
    """As a missing model.path: the quickstart writes runs/quickstart/grpo/final, so --dry-run exits 3 after the
    plan and --rehearse stands in for it (tests/test_rehearse.py rehearses the shipped recipe)."""
    with pytest.raises(MachineError, match="algorithm.teacher: model dir not found: runs/nowhere/final") as err:
        load_and_validate(RECIPE, ["algorithm.teacher=runs/nowhere/final"])
    assert err.value.recipe is not None
    rc = main(["train", str(RECIPE), "--dry-run", "--set", "algorithm.teacher=runs/nowhere/final"])
    out = capsys.readouterr()
    assert rc == 3 and "# plan" in out.out and "local dir, not there yet" in out.out
    assert "an earlier step writes it?" in out.err + out.out


# --------------------------------------------------------------------------------- the teacher's vocabulary


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_tokenizers_before_any_model(
    tmp_path, capsys, tiny_model_dir, byte_model_dir, no_models
):
    path = write_recipe(tmp_path, tiny_model_dir, byte_model_dir)
    for argv in (["train", str(path), "--dry-run"], ["train", str(path)]):
        rc = main(argv)
        text = "".join(capsys.readouterr())
        assert rc == 2 and "Traceback" not in text, text
        assert f"the teacher's tokenizer ({byte_model_dir / 'tokenizer.json'}) does not match the student's " \
               f"({tiny_model_dir / 'tokenizer.json'}): 259 vs 19 tokens; first difference: id 0 is '!' in the " \
               "teacher's, '<pad>' in the student's" in text  # fmt: skip
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_tiny_student_of_another_task_is_refused_against_the_teachers_tokenizer(tmp_path, teacher_dir):
    path = write_recipe(tmp_path, None, teacher_dir, model={"tiny": {"task": "text"}})
    with pytest.raises(RecipeError) as err:
        load_and_validate(path)
    assert "does not match the student's (model.tiny (task 'text')): 19 vs 100 tokens; first difference: id 14 is " \
           "'+' in the teacher's, 'a' in the student's" in str(err.value)  # fmt: skip


def test_the_tokenizer_file_is_read_as_get_vocab_returns_it(tmp_path, tiny_model_dir, byte_model_dir):
    from transformers import AutoTokenizer

    from posttrain.models.tiny import TinySpec, save_tiny_model
    from posttrain.trainers.distill import tokenizer_vocabulary

    chat = save_tiny_model(tmp_path / "chat", TinySpec(task="text", chat=True))  # added tokens beyond the model's
    for model in (tiny_model_dir, byte_model_dir, chat):
        assert tokenizer_vocabulary(model / "tokenizer.json") == AutoTokenizer.from_pretrained(model).get_vocab()


def test_a_qwen25_7b_teacher_of_a_15b_student_is_refused_for_its_padded_output_vocabulary(tmp_path):
    """Qwen2.5-7B pads its output layer to 152064 rows, 1.5B to 151936 (one tokenizer): TRL's trainer refuses the
    pair once both are loaded; the config sizes (KNOWN_SHAPES offline) refuse it before."""
    path = write_recipe(tmp_path, "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B")
    with pytest.raises(RecipeError, match=r"the teacher's output vocabulary \(152064.*the student's \(151936\)"):
        load_and_validate(path)
    load_and_validate(write_recipe(tmp_path, "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"algorithm": {"beta": 2.0}}, ["algorithm.beta must be in [0, 1]", "got 2.0"]),
        ({"algorithm": {"teacher": ""}}, ["algorithm.teacher is required"]),
        ({"training": {"teacher_model_name_or_path": "x/y"}}, ["training.teacher_model_name_or_path", "algorithm.teacher"]),
        ({"rollout": {"num_generations": 4}}, ["rollout.num_generations", "one completion per prompt"]),
        ({"algorithm": {"lmbda": 0.5}}, ["unknown key 'lmbda' in algorithm"]),
    ],
    ids=["beta", "no-teacher", "second-teacher", "groups", "lmbda"],
)  # fmt: skip
def test_recipe_errors_are_found_before_any_model_loads(tmp_path, tiny_model_dir, teacher_dir, changes, words):
    with pytest.raises(RecipeError) as err:
        load_and_validate(write_recipe(tmp_path, tiny_model_dir, teacher_dir, **changes))
    for word in words:
        assert word in str(err.value)


def test_a_teacher_dir_without_a_model_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="is not a transformers model dir"):
        load_and_validate(write_recipe(tmp_path, tiny_model_dir, tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------- memory plan


def test_the_memory_plan_holds_the_teachers_weights(tmp_path, tiny_model_dir, teacher_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.models.memory import Launch, model_shape, plan_for
    from posttrain.registry import get_spec

    recipe = load_and_validate(write_recipe(tmp_path, tiny_model_dir, teacher_dir))
    teacher_bytes = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(teacher_dir).parameters())  # fmt: skip
    launches = ((Launch(), 1), (Launch(processes=4, zero_stage=2), 1), (Launch(processes=4, zero_stage=3), 4))
    for launch, share in launches:
        plan = plan_for(recipe, get_spec("distill"), launch, 80 * 2**30, model_shape(str(tiny_model_dir)))
        terms = [t for t in plan.terms if t.name == "teacher model"]
        assert len(terms) == 1 and terms[0].exact and terms[0].bytes == teacher_bytes / share
    text = "\n".join(dry_run_plan(recipe))
    assert "teacher model" in text.split("memory plan per device", 1)[1] and f"frozen, {teacher_dir}" in text


# ----------------------------------------------------------------------------------------------- training


def test_the_teacher_reaches_trl_frozen_in_eval_mode_in_the_students_dtype(tmp_path, tiny_model_dir, teacher_dir):
    import torch

    from posttrain.runs import RunDir
    from posttrain.trainers.distill import build_trainer

    path = write_recipe(tmp_path, tiny_model_dir, teacher_dir, model={"dtype": "bfloat16"},
                        rollout={"max_new_tokens": 6, "temperature": 0.7}, algorithm={"beta": 0.5})  # fmt: skip
    trainer, _ = build_trainer(load_and_validate(path), RunDir(tmp_path / "run"))
    teacher = trainer.teacher_model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert teacher.config.hidden_size == 128 and trainer.model.config.hidden_size == 64
    args = trainer.args
    assert (args.beta, args.temperature, args.max_completion_length) == (0.5, 0.7, 6)


def reverse_kl(student_dir: Path, teacher_dir: Path) -> float:
    """Mean KL(p_student || p_teacher) over the answer positions of fixed problems ("47+85=132"), teacher-forced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    batch = tokenizer([f"{a}+{b}={a + b}" for a in range(10, 40) for b in (11, 57)], return_tensors="pt", padding=True)
    with torch.no_grad():
        log_s = AutoModelForCausalLM.from_pretrained(student_dir)(**batch).logits.log_softmax(-1)
        log_t = AutoModelForCausalLM.from_pretrained(teacher_dir)(**batch).logits.log_softmax(-1)
    answer = (batch["input_ids"] == tokenizer.convert_tokens_to_ids("=")).cumsum(-1).clamp(max=1)
    mask = (answer * batch["attention_mask"]).float()
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return float((kl * mask).sum() / mask.sum())


def test_a_short_distillation_brings_the_student_towards_the_teacher(tmp_path, tiny_model_dir, teacher_dir):
    """30 steps of 16 prompts: the logged on-policy divergence falls, and so does the student's KL to the teacher on
    fixed problems it never sampled (measured 6.5 -> 2.8 nats per answer token)."""
    from posttrain.runs import RunDir
    from posttrain.trainers.distill import SPEC

    before = reverse_kl(tiny_model_dir, teacher_dir)
    result = train_recipe(load_and_validate(write_recipe(tmp_path, tiny_model_dir, teacher_dir)))
    assert result.global_step == 30
    run = RunDir(tmp_path / "run")
    logged = [r for r in run.read_metrics() if "loss" in r]
    assert all(curve in r for r in logged for curve in SPEC.curves)  # the report's panels have data
    assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]
    assert reverse_kl(run.final, teacher_dir) < 0.6 * before
    assert (run.path / "report.md").is_file() and "eval/arithmetic/accuracy" in result.after


# ----------------------------------------------------------------------------------------------- rehearsal


def test_the_rehearsal_stands_in_for_the_teacher_with_the_students_tokenizer(tmp_path):
    """The shipped recipe (a tiny student; its teacher not there yet) and a hub pair (family stand-ins): the
    teacher becomes a tiny random model in the rehearsal dir, and the rehearsed recipe passes the vocabulary check."""
    from posttrain.rehearse import prepare_rehearsal
    from posttrain.trainers.distill import tokenizer_vocabulary

    try:
        source = load_and_validate(RECIPE)
    except MachineError as err:  # the quickstart has not run here
        source = err.recipe
    hub = load_and_validate(write_recipe(tmp_path / "hub", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"))
    for recipe, student_tokens in ((source, 19), (hub, 259)):
        rehearsal = prepare_rehearsal(recipe, tmp_path / recipe.name / "r")
        raw = yaml.safe_load(rehearsal.recipe_path.read_text())
        teacher = Path(raw["algorithm"]["teacher"])
        assert teacher == rehearsal.workdir / "teacher" and (teacher / "config.json").is_file()
        assert len(tokenizer_vocabulary(teacher / "tokenizer.json")) == student_tokens
        assert any(line.startswith("algorithm.teacher: ") for line in rehearsal.substituted)
        assert "generation with transformers: 1 sample per prompt" in rehearsal.exercised
    assert json.loads((tmp_path / recipe.name / "r" / "teacher" / "config.json").read_text())["model_type"] == "qwen2"


# ------------------------------------------------------------------------------------------- slow: real run


@pytest.mark.slow
def test_distilling_the_quickstart_grpo_model_teaches_a_smaller_student_the_task(quickstart_run, tmp_path):
    """The shipped recipe from the session's quickstart GRPO model (seed 0), shortened to 600 steps (~1 min): the
    random-init student goes from 0 to well above chance (measured: see docs/distill.md for the full runs)."""
    teacher = quickstart_run[0] / "grpo" / "final"
    recipe = load_and_validate(RECIPE, [f"algorithm.teacher={teacher}", f"output_dir={tmp_path / 'distill'}",
                                        "training.max_steps=600", "eval.every_steps=null"])  # fmt: skip
    result = train_recipe(recipe)
    assert result.before["eval/arithmetic/accuracy"] < 0.02
    assert result.after["eval/arithmetic/accuracy"] > 0.3
