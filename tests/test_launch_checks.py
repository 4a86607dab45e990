"""A launch that cannot work is refused before any model loads: DeepSpeed with a trainer whose loop does not run
under it, LoRA where the trainer has none, more processes than the batch splits over; under `accelerate launch`
the environment it sets is what counts, else the recipe's accelerate_config."""

from __future__ import annotations

import pytest
import yaml

from posttrain.errors import RecipeError
from posttrain.models.memory import launch_of_this_process, read_launch
from posttrain.registry import load_and_validate
from posttrain.shipped import recipes_dir


def _config(tmp_path, processes: int, zero: int | None, machines: int = 1):
    data = {"distributed_type": "DEEPSPEED" if zero else "MULTI_CPU", "num_processes": processes,
            "num_machines": machines, "mixed_precision": "no", "use_cpu": True}  # fmt: skip
    if zero:
        data["deepspeed_config"] = {"zero_stage": zero, "offload_optimizer_device": "none"}
    path = tmp_path / f"launch_{processes}_{zero}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _validate(recipe: str, tmp_path, *overrides: str):
    return load_and_validate(recipes_dir() / recipe, [f"output_dir={tmp_path / 'run'}", *overrides])


def test_num_processes_counts_every_machine(tmp_path):
    # accelerate's num_processes is the total over machines (its docs), not per machine
    assert read_launch(_config(tmp_path, 16, 3, machines=2)).processes == 16


def test_seppo_under_deepspeed_is_refused_naming_the_config(tmp_path):
    config = _config(tmp_path, 2, 2)
    with pytest.raises(RecipeError, match=r"trainer 'seppo' cannot run under DeepSpeed ZeRO-2 \(.*launch_2_2.yaml\).*ddp.yaml"):  # fmt: skip
        _validate("seppo/toy_colors.yaml", tmp_path, f"accelerate_config={config}")
    _validate("seppo/toy_colors.yaml", tmp_path, f"accelerate_config={_config(tmp_path, 2, None)}")  # DDP is fine


def test_the_environment_of_accelerate_launch_counts(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_of_this_process() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    launch = launch_of_this_process()
    assert (launch.processes, launch.zero_stage) == (2, 3)
    with pytest.raises(RecipeError, match="cannot run under DeepSpeed ZeRO-3 \\(this accelerate launch\\)"):
        _validate("seppo/toy_colors.yaml", tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert launch_of_this_process().zero_stage is None
    _validate("seppo/toy_colors.yaml", tmp_path)


@pytest.mark.parametrize("recipe", ["polar/quickstart.yaml", "seppo/toy_colors.yaml"])
def test_lora_where_the_trainer_has_none_is_refused(recipe, tmp_path):
    with pytest.raises(RecipeError, match="model.lora: trainer '(polar|seppo)' trains all weights and has no LoRA"):
        _validate(recipe, tmp_path, "model.lora.r=8")


def test_lora_under_zero3_passes_where_trl_supports_it(tmp_path):
    # TRL's trainers wrap the model with peft themselves and handle ZeRO-3 (reentrant checkpointing, adapter dtype)
    config = _config(tmp_path, 2, 3)
    recipe = _validate("sft/arithmetic.yaml", tmp_path, "model.lora.r=8", f"accelerate_config={config}")
    assert recipe.model.lora.r == 8


def test_more_processes_than_the_generation_batch_splits_over(tmp_path):
    config = _config(tmp_path, 8, 2)
    overrides = ["model.path=unused", "training.per_device_train_batch_size=16", "training.generation_batch_size=64"]
    with pytest.raises(RecipeError, match=r"generation_batch_size 64 does not split over 8 process\(es\) x "
                                          r"per_device_train_batch_size 16 = 128"):  # fmt: skip
        _validate("grpo/arithmetic.yaml", tmp_path, *overrides, f"accelerate_config={config}")
    _validate("grpo/arithmetic.yaml", tmp_path, *overrides, f"accelerate_config={_config(tmp_path, 2, 2)}")


def test_group_rules_count_the_configured_processes(tmp_path):
    # 2 processes x 6 completions = 12 per micro-batch, 8 generations per prompt: groups cannot be whole
    config = _config(tmp_path, 2, None)
    overrides = ["model.path=unused", "training.per_device_train_batch_size=6"]
    _validate("grpo/arithmetic.yaml", tmp_path, *overrides, "rollout.num_generations=6")
    with pytest.raises(RecipeError, match=r"num_generations \(8\) must divide the generation batch \(12 = "
                                          r"training.per_device_train_batch_size 6 x 2 process"):  # fmt: skip
        _validate("grpo/arithmetic.yaml", tmp_path, *overrides, f"accelerate_config={config}")
