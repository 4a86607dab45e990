"""`trainer: grpo`: group-relative policy optimisation over TRL's GRPOTrainer.

The recipe's `rollout` section maps onto GRPOConfig's generation fields and `algorithm` onto its loss fields
(`loss_type`, `beta`, `epsilon`, `scale_rewards`, ...); rewards come from `reward_models` by name.
"""

from __future__ import annotations

from typing import Any

from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.base import (
    RunResult,
    config_kwargs,
    load_policy_tokenizer_data,
    run_training,
    standard_plan,
)
from posttrain.trainers.dynamic_sampling import DynamicSamplingOptions

# GRPOConfig fields that define a GRPO-family method (NFT and RFT reuse TRL's sampling, so they accept them too).
GRPO_METHOD_KEYS = frozenset(
    {
        "beta", "loss_type", "epsilon", "epsilon_high", "delta", "scale_rewards", "num_iterations",
        "importance_sampling_level", "mask_truncated_completions", "top_entropy_quantile", "steps_per_generation",
        "sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha", "repetition_penalty", "min_p",
    }
)  # fmt: skip

SPEC = TrainerSpec(
    name="grpo",
    description="group-relative policy optimisation with verifiable or model rewards (TRL GRPOTrainer)",
    options=DynamicSamplingOptions,
    library_config="trl.trainer.grpo_config:GRPOConfig",
    method_keys=GRPO_METHOD_KEYS,
    needs_rewards=True,
    curves=("reward", "loss"),
    train_schema="prompt",
    eval_schema="prompt_answer",
    generates=True,
    tools=True,
    reference_model=True,  # with beta > 0 (TRL's default is 0: no reference)
    paper="[DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models]"
    "(https://arxiv.org/abs/2402.03300)",
)


def rollout_kwargs(recipe: Recipe) -> dict[str, Any]:
    """GRPOConfig fields from the recipe's rollout section."""
    r = recipe.rollout
    kwargs: dict[str, Any] = {
        "num_generations": r.num_generations,
        "max_completion_length": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": r.top_k,
    }
    if r.backend == "vllm":
        kwargs.update(
            use_vllm=True,
            vllm_mode=r.vllm.mode,
            vllm_gpu_memory_utilization=r.vllm.gpu_memory_utilization,
            vllm_tensor_parallel_size=r.vllm.tensor_parallel_size,
            vllm_server_host=r.vllm.server_host,
            vllm_server_port=r.vllm.server_port,
        )
    if r.max_tool_calls is not None:
        kwargs["max_tool_calling_iterations"] = r.max_tool_calls
    return kwargs


def batch_geometry(recipe: Recipe, num_processes: int = 1) -> dict[str, int]:
    """TRL's batch arithmetic, computed without importing TRL (for --dry-run)."""
    s = recipe.settings
    per_device = s.per_device_train_batch_size
    accum = s.gradient_accumulation_steps
    steps_per_gen = s.steps_per_generation or accum
    generation_batch = s.generation_batch_size or per_device * num_processes * steps_per_gen
    micro_steps = generation_batch // max(per_device * num_processes, 1)  # micro-batches per generation, per process
    return {
        "per_device": per_device,
        "processes": num_processes,
        "accumulation": accum,
        "generation_batch": generation_batch,
        "num_generations": recipe.rollout.num_generations,
        "prompts_per_generation": generation_batch // max(recipe.rollout.num_generations, 1),
        "micro_steps": micro_steps,
        # Optimizer steps taken from one generation batch: after the first, pi_old (the policy that sampled) lags
        # pi_theta, TRL recomputes pi_old's log-probs, and likelihood ratios leave 1 (off-policy updates).
        "optimizer_steps_per_generation": micro_steps // max(accum, 1),
    }


def plan_processes(recipe: Recipe) -> int:
    """Processes a plan counts: the planned launch's (`posttrain launch --nodes N --gpus-per-node G`), else this
    launch's (WORLD_SIZE), else the recipe's accelerate_config's, else 1."""
    import os

    from posttrain.models.memory import planned_launch

    if planned_launch() is not None:
        return planned_launch().processes
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if recipe.accelerate_config:
        from pathlib import Path

        from posttrain.models.memory import read_launch

        path = Path(recipe.resolve_path(recipe.accelerate_config))
        if path.is_file():
            try:
                return read_launch(path).processes
            except Exception:  # an unreadable config is reported by validation; the plan falls back to 1
                return 1
    return 1


def tools_line(recipe: Recipe) -> str:
    """The dry-run line on multi-turn rollouts (posttrain.rollout.tools)."""
    from posttrain.rollout.tools import offered, uses_tools

    r = recipe.rollout
    if not uses_tools(recipe):
        return "tool loop: off (each rollout is one completion)"
    rounds = f"at most {r.max_tool_calls} tool-calling round(s)" if r.max_tool_calls else "no cap on tool-calling rounds"
    return (f"tool loop: {', '.join(offered(recipe))}; {rounds} per rollout, so at most "
            f"{(r.max_tool_calls or 0) + 1 if r.max_tool_calls else 'unbounded'} assistant turns; every turn and tool "
            f"result shares the {r.max_new_tokens}-token completion budget (rollout.max_new_tokens: the memory plan's "
            "sequence length), and tool-result tokens carry no loss")  # fmt: skip


def dynamic_line(recipe: Recipe, which: str = "groups whose rewards do not vary") -> str:
    """The dry-run line on dynamic sampling; `which` says what groups the trainer drops."""
    if not recipe.options.dynamic_sampling:
        return f"dynamic sampling: off ({which} stay in the batch)"
    rounds = recipe.options.max_generation_rounds
    return (f"dynamic sampling: on; {which} are dropped and more prompts generated, up to {rounds} generation "
            "rounds per batch (then kept groups repeat to fill it)")  # fmt: skip


def steps_line(recipe: Recipe) -> str:
    g = batch_geometry(recipe, plan_processes(recipe))
    n = g["optimizer_steps_per_generation"]
    if n <= 1:
        return "optimizer steps per generation: 1 (strictly on-policy: every likelihood ratio is 1)"
    return (f"optimizer steps per generation: {n} ({g['generation_batch'] // n} completions each; pi_old's "
            "log-probs recomputed, so ratios leave 1 after the first step: off-policy updates)")  # fmt: skip


def group_rule_line(recipe: Recipe) -> str:
    g = batch_geometry(recipe, plan_processes(recipe))
    ok = g["generation_batch"] % g["num_generations"] == 0
    return "rule: the generation batch must be a multiple of num_generations so every prompt's group is whole" + (
        "" if ok else "  <-- VIOLATED: change per_device_train_batch_size or num_generations"
    )


def problems(recipe: Recipe) -> list[str]:
    """Batch rules TRL checks only once the model is loaded (GRPOConfig.__post_init__), with the fix: every
    prompt's group of `num_generations` must fit whole in the generation batch, on the processes of this launch
    (WORLD_SIZE under `accelerate launch`, else the recipe's accelerate_config)."""
    g = batch_geometry(recipe, plan_processes(recipe))
    found = []
    per_step = g["per_device"] * g["processes"]
    if recipe.settings.generation_batch_size and g["generation_batch"] % per_step != 0:
        found.append(
            f"training.generation_batch_size {g['generation_batch']} does not split over {g['processes']} process(es) "
            f"x per_device_train_batch_size {g['per_device']} = {per_step} completions per micro-batch; make it a "
            f"multiple of {per_step} (or use fewer processes)"
        )
    if g["generation_batch"] % g["num_generations"] != 0:
        found.append(
            f"rollout.num_generations ({g['num_generations']}) must divide the generation batch "
            f"({g['generation_batch']} = training.per_device_train_batch_size {g['per_device']} x {g['processes']} "
            f"process(es) x {g['micro_steps']} step(s) per generation); change per_device_train_batch_size or "
            "num_generations"
        )
    dynamic = recipe.options is not None and recipe.options.dynamic_sampling
    local = g["per_device"] * g["micro_steps"]  # completions one process generates per generation batch
    if dynamic and local % max(g["num_generations"], 1) != 0:
        found.append(
            f"algorithm.dynamic_sampling needs whole groups on every process: each process generates {local} "
            f"completions per generation batch (per_device_train_batch_size {g['per_device']} x {g['micro_steps']} "
            f"micro-batches), not a multiple of rollout.num_generations {g['num_generations']}"
        )
    if dynamic and recipe.rollout.top_k == 1:
        found.append(
            "algorithm.dynamic_sampling with rollout.top_k 1 (greedy): every answer of a group is the same, so its "
            "rewards can never vary and every group would be dropped; sample (top_k 0 or > 1)"
        )
    if g["micro_steps"] % max(g["accumulation"], 1) != 0:
        found.append(
            f"the generation batch does not divide into optimizer steps: {g['micro_steps']} micro-batches per "
            f"generation (algorithm.steps_per_generation, or generation_batch_size {g['generation_batch']} / "
            f"({g['per_device']} x {g['processes']} process(es))) is not a multiple of "
            f"training.gradient_accumulation_steps {g['accumulation']}; set steps_per_generation to k x "
            f"{g['accumulation']} for k optimizer steps per generation"
        )
    return found


def rewards_line(recipe: Recipe) -> str:
    return "rewards: " + ", ".join(f"{r.name} x{r.weight:g}" for r in recipe.rewards)


def plan(recipe: Recipe) -> list[str]:
    g = batch_geometry(recipe, plan_processes(recipe))
    return standard_plan(
        recipe,
        [
            f"GRPO: each generation batch holds {g['generation_batch']} completions = "
            f"{g['prompts_per_generation']} prompts x {g['num_generations']} samples "
            f"(per_device_train_batch_size {g['per_device']} x {g['processes']} process(es) x "
            f"{g['micro_steps']} micro-batch(es)); TRL counts completions, not prompts, in the batch size",
            group_rule_line(recipe),
            steps_line(recipe),
            dynamic_line(recipe),
            tools_line(recipe),
            f"rollout backend: {recipe.rollout.backend}"
            + (f" ({recipe.rollout.vllm.mode})" if recipe.rollout.backend == "vllm" else ""),
            rewards_line(recipe),
        ],
    )


def rehearse(edit: Any) -> None:
    """`--rehearse` (posttrain.rehearsal_edit): each micro-batch one whole generation group (at most 4 samples) per
    process; several optimizer steps per generation stay several (both rehearsed steps from one generation); at most
    2 dynamic-sampling rounds."""
    old_groups, old_accum = edit.recipe.rollout.num_generations, int(edit.value("gradient_accumulation_steps"))
    groups = min(old_groups, 4)
    if groups != old_groups:
        edit.note(f"rollout.num_generations: {old_groups} -> {groups}")
    edit.rollout["num_generations"] = groups
    edit.shrink_batch(per_device=groups)
    accum = edit.training["gradient_accumulation_steps"]
    steps = edit.value("steps_per_generation")
    if steps is not None and int(steps) > old_accum:
        edit.algorithm["steps_per_generation"] = edit.steps * accum
        edit.note(f"steps_per_generation: {steps} ({int(steps) // old_accum} optimizer steps per generation) -> "
                  f"{edit.steps * accum} (both rehearsed steps from one generation)")  # fmt: skip
        edit.did("off-policy optimizer steps: the second step trains on the first step's generation")
    elif steps is not None:
        edit.algorithm["steps_per_generation"] = accum
    if edit.training.pop("generation_batch_size", None) is not None:
        edit.note("generation_batch_size: removed (it follows the batch sizes)")
    if "max_generation_rounds" in edit.algorithm:
        edit.algorithm["max_generation_rounds"] = min(int(edit.algorithm["max_generation_rounds"]), 2)
    if edit.recipe.options is not None and edit.recipe.options.dynamic_sampling:
        edit.did("dynamic sampling (at most 2 rounds)")
    edit.train_steps()


def reward_functions(recipe: Recipe):
    from reward_models import build_rewards

    specs = [{"name": r.name, "weight": r.weight, "kwargs": r.kwargs} for r in recipe.rewards]
    return build_rewards(specs)


def trainer_class():
    """TRL's GRPOTrainer with dynamic sampling (a pass-through unless `algorithm.dynamic_sampling` is on); imports
    TRL, so only when training."""
    from trl import GRPOTrainer

    from posttrain.trainers.dynamic_sampling import DynamicSamplingMixin
    from posttrain.trainers.tool_rollouts import ToolRolloutMixin

    class PosttrainGRPOTrainer(ToolRolloutMixin, DynamicSamplingMixin, GRPOTrainer):
        pass

    return PosttrainGRPOTrainer


def build_trainer(recipe: Recipe, run: RunDir, trainer_class: Any = None):
    """The configured GRPOTrainer (or another TRL trainer of the family: NFT's subclass, RLOOTrainer) with model, data
    and rewards from the recipe, its config the recipe trainer's `SPEC.library_config` (GRPOConfig, RLOOConfig, ...);
    the trainer's own option keys never reach the config (`config_kwargs` strips them)."""
    import importlib

    from trl import GRPOTrainer

    from posttrain.registry import get_spec

    module, _, name = get_spec(recipe.trainer, recipe.where).library_config.partition(":")
    config_class = getattr(importlib.import_module(module), name)

    from posttrain.models.loading import peft_config
    from reward_models import reward_columns

    read = [c for r in recipe.rewards for c in reward_columns(r.name, r.kwargs)]  # checked in every row
    model, tokenizer, rows = load_policy_tokenizer_data(recipe, run, schema=tuple(dict.fromkeys(("prompt", *read))))
    funcs, weights = reward_functions(recipe)
    config = config_class(**config_kwargs(recipe, run), **rollout_kwargs(recipe), reward_weights=weights)
    tokenizer.padding_side = "left"
    from posttrain.rollout import tools

    tool_log = tools.ToolLog()
    trainer = (trainer_class or GRPOTrainer)(
        model=model,
        reward_funcs=funcs,
        args=config,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config(recipe.model),
        **tools.trainer_kwargs(recipe, tool_log),
    )
    trainer.tool_log, trainer.tool_run_dir = tool_log, run.path
    return trainer, tokenizer


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    trainer, tokenizer = build_trainer(recipe, run, trainer_class=trainer_class())
    trainer.dynamic_options = recipe.options
    return run_training(recipe, trainer, tokenizer, run, resume)
