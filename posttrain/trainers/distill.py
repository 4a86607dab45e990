"""`trainer: distill`: on-policy distillation over TRL's DistillationTrainer (Agarwal et al. 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", the GKD paper).

A frozen teacher p_T (`algorithm.teacher`, a model dir or hub id) teaches a student p_S (the recipe's `model`). For
each prompt x the student samples one completion y ~ p_S(. | x) (`rollout.temperature`, up to
`rollout.max_new_tokens` tokens), and the loss is the divergence between the two models' next-token distributions
at every position of that completion, averaged over the batch's completion tokens (GKD with lambda = 1: every
sequence is the student's own, so it learns on the states it actually visits, not only on the teacher's):

    L(theta) = E_x E_{y ~ p_S(.|x)} [ 1/|y| sum_n D( p_T(. | x, y_<n) , p_S^theta(. | x, y_<n) ) ]

D is the generalized Jensen-Shannon divergence of the paper (Sec. 3), chosen by `algorithm.beta`, with the mixture
m = beta p_T + (1 - beta) p_S:

    JSD(beta) = beta KL(p_T || m) + (1 - beta) KL(p_S || m)       (0 < beta < 1; 0.5 is the usual JSD)
    beta = 0: the forward KL(p_T || p_S) (mode-covering, what supervised distillation minimises)
    beta = 1: the reverse KL(p_S || p_T) (mode-seeking; TRL's default)

Both distributions are taken at the same temperature as the sampling (TRL's DistillationConfig has one
`temperature` for both). As in the paper, no gradient flows through the sampling: y is data once drawn, and the
gradient is that of the per-token divergences at the student's own prefixes. There is no reward and no reference
model; the logged `loss` is D itself (per completion token), so it falls as the student matches the teacher.

TRL owns the sampling, the teacher's forward pass and the chunked divergence (both models' hidden states are
projected through their own `lm_head` a tile at a time, so the teacher may be wider or deeper than the student but
must share its vocabulary). posttrain adds the recipe (the `rollout` section maps onto DistillationConfig's
generation fields, `algorithm.beta` selects the divergence), the teacher's checks before any model loads (its path,
and a tokenizer with the student's vocabulary, compared from the tokenizer files), the teacher in the `--dry-run`
memory plan (`SPEC.teacher_option`), its `--rehearse` stand-in, held-out evaluation and the report. TRL 1.16's
trainer is GKD's on-policy case only: the mixed lambda (some sequences from a fixed data set) is
trl.experimental.gkd's, not used here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.base import RunResult, config_kwargs, load_policy_tokenizer_data, run_training, standard_plan


@dataclass(frozen=True)
class DistillOptions:
    """`algorithm:` keys of on-policy distillation that posttrain owns."""

    teacher: str = field(
        default="",
        metadata={"help": "the frozen teacher: a model dir (relative to the recipe file, or the working directory) "
                  "or a hub id; its tokenizer must have the student's vocabulary"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not str(self.teacher).strip():
            raise ValueError("algorithm.teacher is required: the teacher model's dir or hub id")


SPEC = TrainerSpec(
    name="distill",
    description="on-policy distillation: the student samples, a frozen teacher's next-token distributions are the "
    "targets (GKD, Agarwal et al. 2024; TRL DistillationTrainer)",
    options=DistillOptions,
    library_config="trl.trainer.distillation_config:DistillationConfig",
    # beta selects the divergence (not a KL penalty: there is no reference model); the two sampling knobs sit with
    # it, as in GRPO's method keys.
    method_keys=frozenset({"beta", "min_p", "repetition_penalty"}),
    curves=("loss", "entropy"),
    train_schema="prompt",
    eval_schema="prompt_answer",
    generates=True,
    teacher_option="teacher",
    paper="[On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes]"
    "(https://arxiv.org/abs/2306.13649)",
)

# DistillationConfig fields that would name or load a second teacher (or reload the student): posttrain loads both
# models itself, from `algorithm.teacher` and `model`.
MODEL_LOADING_KEYS = ("teacher_model_name_or_path", "teacher_model_revision", "teacher_model_init_kwargs",
                      "model_init_kwargs")  # fmt: skip


# ------------------------------------------------------------------------------------- teacher and vocabulary


def teacher_source(recipe: Recipe) -> str:
    """The teacher's dir (relative to the recipe file when it is there) or hub id."""
    return recipe.resolve_path(recipe.options.teacher)


def model_file(source: str, name: str) -> Path | None:
    """A file of a model dir, or of a hub model in the local cache (never downloaded); None when neither has it."""
    path = Path(source).expanduser() / name
    if path.is_file():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, name)
    except Exception:  # not a valid repo id: not in any cache
        return None
    return Path(cached) if isinstance(cached, str) else None


def tokenizer_vocabulary(path: Path) -> dict[str, int] | None:
    """token -> id of a `tokenizer.json`, read as JSON (no tokenizer is built): its model's vocabulary and its added
    tokens, what a fast tokenizer's `get_vocab()` returns. None for a file this does not understand."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):  # WordLevel, WordPiece, BPE
        found = {str(token): int(i) for token, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
        found = {str(entry[0]): i for i, entry in enumerate(vocab)}
    else:
        return None
    found.update({str(t["content"]): int(t["id"]) for t in data.get("added_tokens") or []})
    return found


def student_vocabulary(recipe: Recipe) -> tuple[str, dict[str, int] | None]:
    """(where the student's tokenizer comes from, its vocabulary or None when it cannot be read here). A tiny spec's
    character vocabulary comes from `models.tiny`, its owner (built in memory, no files or weights)."""
    if recipe.model.tiny is not None:
        from posttrain.models.tiny import TinySpec, build_tokenizer

        try:
            spec = TinySpec(**recipe.model.tiny)
            return f"model.tiny (task '{spec.task}')", build_tokenizer(spec.task, spec.chat, spec.tools).get_vocab()
        except (TypeError, PosttrainError):  # a bad spec: check_model reports it
            return "model.tiny", None
    if not recipe.model.path:  # no model at all: validation reports it
        return "model", None
    source = recipe.resolve_path(recipe.model.path)
    path = model_file(source, "tokenizer.json")
    return (str(path), tokenizer_vocabulary(path)) if path else (source, None)


def vocabulary_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    """How two vocabularies differ (sizes, the first id whose token differs), or None when they are the same."""
    if teacher == student:
        return None
    by_id_t, by_id_s = {i: t for t, i in teacher.items()}, {i: t for t, i in student.items()}
    first = next((i for i in sorted(by_id_t.keys() | by_id_s.keys()) if by_id_t.get(i) != by_id_s.get(i)), None)

    def token(table: dict[int, str]) -> str:
        return repr(table[first]) if first in table else "absent"

    where = (f"id {first} is {token(by_id_t)} in the teacher's, {token(by_id_s)} in the student's" if first is not None
             else "the same ids, spelt differently")  # fmt: skip
    return f"{len(teacher)} vs {len(student)} tokens; first difference: {where}"


def teacher_problems(recipe: Recipe) -> list[str | PosttrainError]:
    """The teacher is there (a local path not there yet is a MachineError, as a missing model.path is: an earlier
    step often writes it), is a model dir, and has the student's vocabulary: its tokenizer.json against the
    student's (or the tiny spec's), and the output sizes TRL compares once both models are loaded."""
    from posttrain.data.sources import _looks_local
    from posttrain.models.memory import model_shape
    from posttrain.preflight import MachineError

    given, source = recipe.options.teacher, teacher_source(recipe)
    path = Path(source).expanduser()
    if not path.exists() and _looks_local(given):
        return [MachineError(f"{recipe.where}: algorithm.teacher: model dir not found: {given} (an earlier step "
                             "writes it? run that first, or copy the model there)")]  # fmt: skip
    if path.exists() and not (path / "config.json").is_file():
        return [f"algorithm.teacher {path} is not a transformers model dir (no config.json)"]
    teacher_file = model_file(source, "tokenizer.json")
    student_where, student = student_vocabulary(recipe)
    teacher = tokenizer_vocabulary(teacher_file) if teacher_file else None
    if teacher is not None and student is not None:
        difference = vocabulary_difference(teacher, student)
        if difference:
            return [f"algorithm.teacher: the teacher's tokenizer ({teacher_file}) does not match the student's "
                    f"({student_where}): {difference}; distillation compares the two next-token distributions id by "
                    "id, so both models need one vocabulary"]  # fmt: skip
    teacher_shape = model_shape(source)
    student_shape = None if recipe.model.tiny is not None else model_shape(recipe.resolve_path(recipe.model.path or ""))
    student_size = student_shape.vocab if student_shape else (len(student) if recipe.model.tiny and student else None)
    if teacher_shape is not None and student_size is not None and teacher_shape.vocab != student_size:
        return [f"algorithm.teacher: the teacher's output vocabulary ({teacher_shape.vocab}, config.json "
                f"vocab_size of {source}) differs from the student's ({student_size}); TRL's DistillationTrainer "
                "compares the two distributions over one vocabulary and refuses this"]  # fmt: skip
    return []


def problems(recipe: Recipe) -> list[str | PosttrainError]:
    """Before any model loads: the teacher (`teacher_problems`), a divergence TRL accepts (it checks `beta` only once
    the config is built), no second way of naming models, no sample groups."""
    found: list[str | PosttrainError] = [
        f"training.{key}: posttrain loads the teacher from algorithm.teacher and the student from model; remove it"
        for key in MODEL_LOADING_KEYS
        if key in recipe.training
    ]
    beta = recipe.settings.get("beta")
    if isinstance(beta, int | float) and not 0 <= beta <= 1:
        found.append(f"algorithm.beta must be in [0, 1] (0: forward KL, 1: reverse KL, between: JSD), got {beta}")
    if "num_generations" in (recipe.raw.get("rollout") or {}):
        found.append("rollout.num_generations: distillation samples one completion per prompt (no groups); remove it")
    if recipe.options is not None and recipe.options.teacher:
        found += teacher_problems(recipe)
    return found


# --------------------------------------------------------------------------------------------- dry-run plan


def divergence_line(beta: float) -> str:
    if beta == 1.0:
        return "beta 1: the reverse KL(p_student || p_teacher), mode-seeking (TRL's default)"
    if beta == 0.0:
        return "beta 0: the forward KL(p_teacher || p_student), mode-covering"
    return (f"beta {beta:g}: the generalized JSD, {beta:g} KL(p_teacher || m) + {1 - beta:g} KL(p_student || m) with "
            f"m = {beta:g} p_teacher + {1 - beta:g} p_student")  # fmt: skip


def teacher_line(recipe: Recipe) -> str:
    from posttrain.models.memory import model_shape

    source = teacher_source(recipe)
    where = "local dir" if Path(source).exists() else ("hub id, loaded at train time" if source.count("/") == 1
                                                        else "local dir, not there yet")  # fmt: skip
    shape = model_shape(source)
    size = f"; {shape.params / 1e6:.2f}M parameters, vocabulary {shape.vocab}" if shape else ""
    return f"teacher: {source} ({where}{size}), frozen in eval mode, loaded in the student's dtype (model.dtype)"


def plan(recipe: Recipe) -> list[str]:
    s, r = recipe.settings, recipe.rollout
    prompts = s.per_device_train_batch_size * s.gradient_accumulation_steps
    return standard_plan(
        recipe,
        [
            teacher_line(recipe),
            f"on-policy distillation: {prompts} prompts per optimizer step per process (per_device_train_batch_size "
            f"{s.per_device_train_batch_size} x gradient_accumulation_steps {s.gradient_accumulation_steps}), one "
            "completion each sampled by the student once per optimizer step (strictly on-policy), temperature "
            f"{r.temperature:g}, up to {r.max_new_tokens} tokens",
            f"loss: per completion token, D(teacher || student) on the student's own prefixes at temperature "
            f"{r.temperature:g}, D = {divergence_line(float(s.beta))}; no reward, no reference model",
            f"rollout backend: {r.backend}" + (f" ({r.vllm.mode})" if r.backend == "vllm" else ""),
        ],
    )


def rehearse(edit: Any) -> None:
    """`--rehearse`: the default batch and steps, and the teacher replaced by a tiny random stand-in with the
    student's tokenizer (the student is a tiny spec, or by now the byte-tokenizer stand-in of its family)."""
    from posttrain.models.stand_ins import model_family
    from posttrain.models.tiny import TinySpec, save_family_model, save_tiny_model

    edit.shrink_batch()
    edit.train_steps()
    given = edit.recipe.options.teacher
    target = Path(edit.workdir) / "teacher"
    tiny = (edit.raw.get("model") or {}).get("tiny")
    if tiny is not None:
        save_tiny_model(target, TinySpec(**{**tiny, "seed": int(tiny.get("seed", 0)) + 1}))
        how = "a tiny random model of the student's tiny spec (its tokenizer; seed + 1)"
    else:
        family, _ = model_family(edit.recipe.resolve_path(given))
        _, built = save_family_model(target, family, seed=edit.recipe.seed + 1)
        how = f"a tiny random {built} model with the student stand-in's byte tokenizer"
    edit.algorithm["teacher"] = str(target)
    edit.note(f"algorithm.teacher: {given} -> {how}")
    edit.did("on-policy distillation: the student samples, the frozen teacher's forward pass in every step")


# ------------------------------------------------------------------------------------------------ training


def rollout_kwargs(recipe: Recipe) -> dict[str, Any]:
    """DistillationConfig's generation fields from the rollout section: GRPO's mapping, less the group size."""
    from posttrain.trainers.grpo import rollout_kwargs as grpo_rollout_kwargs

    kwargs = grpo_rollout_kwargs(recipe)
    kwargs.pop("num_generations")
    return kwargs


def load_teacher(recipe: Recipe) -> Any:
    """The teacher with the student's dtype, attention implementation and remote-code setting, frozen, in eval mode."""
    from posttrain.models.loading import load_policy, resolve_precision

    teacher = load_policy(teacher_source(recipe), recipe.model, resolve_precision(recipe.settings.precision))
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_trainer(recipe: Recipe, run: RunDir):
    """The configured DistillationTrainer and the student's tokenizer (left padding, as TRL's generation needs)."""
    from trl import DistillationConfig, DistillationTrainer

    from posttrain.models.loading import peft_config

    model, tokenizer, rows = load_policy_tokenizer_data(recipe, run, schema="prompt")
    config = DistillationConfig(**config_kwargs(recipe, run), **rollout_kwargs(recipe))
    tokenizer.padding_side = "left"
    trainer = DistillationTrainer(
        model=model,
        teacher_model=load_teacher(recipe),
        args=config,
        train_dataset=rows.select_columns(["prompt"]),
        processing_class=tokenizer,
        peft_config=peft_config(recipe.model),
    )
    return trainer, tokenizer


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    trainer, tokenizer = build_trainer(recipe, run)
    return run_training(recipe, trainer, tokenizer, run, resume)
