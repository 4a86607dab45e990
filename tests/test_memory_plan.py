"""The --dry-run memory plan: parameter counts against real models, model states against DeepSpeed's own
estimator functions and hand-computed bytes, the verdict and the knob it names."""

from __future__ import annotations

import pytest

from posttrain.cli import main
from posttrain.models.memory import (
    GIB,
    KNOWN_SHAPES,
    Launch,
    ModelShape,
    model_shape,
    model_state_terms,
    parse_size,
)
from posttrain.shipped import recipes_dir
from tests.conftest import REPO

GPU_RECIPES = ["grpo/qwen2.5-math-1.5b-gsm8k.yaml", "nft/qwen2.5-math-7b.yaml", "polar/pretrain_1.5b.yaml",
               "polar/grpo_qwen2.5-7b_polar.yaml"]  # fmt: skip


def test_parameter_counts_match_the_published_models_and_a_built_one(tmp_path):
    # Published totals of Qwen2.5-1.5B and Qwen2.5-7B (model cards: 1.54B / 7.61B; exact from the safetensors index).
    assert KNOWN_SHAPES["Qwen/Qwen2.5-1.5B"].params == 1_543_714_304
    assert KNOWN_SHAPES["Qwen/Qwen2.5-7B"].params == 7_615_616_512
    from posttrain.models.tiny import TinySpec, build_tiny_model

    model, _ = build_tiny_model(TinySpec(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96))
    model.save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    assert shape is not None and shape.params == model.num_parameters()


def test_model_states_by_hand():
    p, n = 1_000_000_000, 8
    total = lambda terms: sum(t.bytes for t in terms)  # noqa: E731
    # no DeepSpeed, bf16 weights: weights + gradients + AdamW m and v, all 2 bytes
    assert total(model_state_terms(p, p, 2, Launch())) == 8 * p
    # ZeRO-2: 2 bytes of weights full, 2 of gradients and 16 of fp32 states sharded over 8; ZeRO-1: gradients whole
    assert total(model_state_terms(p, p, 2, Launch(processes=n, zero_stage=2))) == 2 * p + 18 * p / n
    assert total(model_state_terms(p, p, 2, Launch(processes=n, zero_stage=1))) == 4 * p + 16 * p / n
    # ZeRO-3: 2 bytes of weights and 2 of gradients sharded + 16 sharded + the largest layer's weights and gradients
    assert total(model_state_terms(p, p, 2, Launch(processes=n, zero_stage=3), largest_layer=10**8)) == (
        20 * p / n + 4 * 10**8
    )
    # LoRA under ZeRO-2: full frozen weights, adapters' gradients and states only
    assert total(model_state_terms(p, 10**6, 2, Launch(processes=n, zero_stage=2))) == 2 * p + 18 * 10**6 / n


@pytest.mark.parametrize("gpus", [1, 8])
def test_model_states_equal_deepspeeds_own_estimators(gpus):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape: ModelShape = KNOWN_SHAPES["Qwen/Qwen2.5-7B"]
    p, layer = shape.params, shape.largest_layer_params
    for offload in (False, True):
        _, gpu2 = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=gpus, cpu_offload=offload)
        ours = model_state_terms(p, p, 2, Launch(processes=gpus, zero_stage=2, offload_optimizer=offload))
        assert sum(t.bytes for t in ours) == pytest.approx(gpu2, rel=1e-6)
        _, gpu3, _ = estimate_zero3_model_states_mem_needs(p, layer, num_gpus_per_node=gpus, cpu_offload=offload,
                                                           cpu_offload_params=offload)  # fmt: skip
        launch = Launch(processes=gpus, zero_stage=3, offload_optimizer=offload, offload_params=offload)
        # plus ZeRO-3's gradient partition buffer (2 bytes per parameter, sharded), which DeepSpeed's estimator omits
        # and a ZeRO-3 run holds (test_deepspeed_launch.py measures it)
        grads = 0 if offload else 2 * p / gpus
        assert sum(t.bytes for t in model_state_terms(p, p, 2, launch, layer)) == pytest.approx(gpu3 + grads, rel=1e-6)


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_dry_run_of_each_gpu_recipe_prints_its_memory_plan(recipe, capsys):
    rc = main(["train", str(recipes_dir() / recipe), "--dry-run"])
    out = capsys.readouterr().out
    assert rc in (0, 3)  # 3: valid, but this machine has no vLLM/GPU (or the input an earlier step writes)
    assert "memory plan per device (8 process(es), ZeRO-" in out
    assert "weights (16-bit)" in out and "total" in out and "device 80 GiB assumed" in out


def test_a_plan_that_does_not_fit_names_the_knob(capsys):
    path = str(recipes_dir() / "grpo/qwen2.5-math-1.5b-gsm8k.yaml")
    main(["train", path, "--dry-run", "--gpu-memory", "24GiB"])
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "the largest term is logits" in out and "per_device_train_batch_size" in out
    main(["train", path, "--dry-run", "--gpu-memory", "141GiB", "--set", "rollout.vllm.gpu_memory_utilization=0.1"])
    assert "fits" in capsys.readouterr().out
    main(["train", path, "--dry-run", "--gpu-memory", "40GiB", "--set", "rollout.vllm.gpu_memory_utilization=0.9"])
    assert "the largest term is vllm" in capsys.readouterr().out


def test_memory_sizes_and_bad_launch_configs(tmp_path, capsys):
    assert parse_size("80GiB") == 80 * GIB and parse_size("80GB") == 80 * 10**9 and parse_size("24g") == 24 * GIB
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(SystemExit):
        main(["train", str(recipes_dir() / "sft/arithmetic.yaml"), "--dry-run", "--gpu-memory", "lots"])
    assert "not a memory size" in capsys.readouterr().err
    rc = main(["train", str(recipes_dir() / "sft/arithmetic.yaml"), "--dry-run", "--set", "accelerate_config=no.yaml"])
    assert rc == 2 and "accelerate_config: file not found: no.yaml" in capsys.readouterr().err


def test_peak_memory_is_logged_on_a_cuda_device_only(monkeypatch):
    import torch

    from posttrain.trainers.callbacks import PeakMemory

    keys = {"memory/peak_allocated_gib", "memory/peak_reserved_gib"}
    # this machine as it is: the two keys appear exactly when it has CUDA
    logs: dict = {"loss": 1.0}
    PeakMemory().on_log(None, None, None, logs=logs)
    assert set(logs) == {"loss"} | (keys if torch.cuda.is_available() else set())

    def no_cuda_query(*args, **kwargs):
        raise AssertionError("CUDA memory was queried on a machine without CUDA")

    # no CUDA, forced so that a GPU machine checks this branch too: logs unchanged, CUDA never queried
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", no_cuda_query)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", no_cuda_query)
    logs = {"loss": 1.0}
    PeakMemory().on_log(None, None, None, logs=logs)
    assert logs == {"loss": 1.0}
    PeakMemory().on_log(None, None, None, logs=None)  # nothing to log into: no error

    # CUDA, faked on every machine: the peaks in GiB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 1024**3)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: int(4.5 * 1024**3))
    PeakMemory().on_log(None, None, None, logs=logs)
    assert logs == {"loss": 1.0, "memory/peak_allocated_gib": 3.0, "memory/peak_reserved_gib": 4.5}


def test_memory_vs_plan_sets_the_largest_logged_peak_beside_the_plan(tmp_path):
    import importlib.util

    from posttrain.models.memory import GIB, model_shape, parse_size, plan_for, read_launch
    from posttrain.preflight import MachineError
    from posttrain.registry import get_spec, load_and_validate
    from posttrain.runs import RunDir

    spec = importlib.util.spec_from_file_location("memory_vs_plan", REPO / "scripts" / "memory_vs_plan.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    name = recipes_dir() / "grpo" / "qwen2.5-math-1.5b-gsm8k.yaml"
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert "no memory/ metrics logged" in script.comparison(str(name), str(run.path))[-1]
    for peak in (10.0, 20.5, 18.0):
        run.append_metrics(
            {"step": 1, "loss": 0.1, "memory/peak_allocated_gib": peak, "memory/peak_reserved_gib": 22.0}
        )
    try:
        recipe = load_and_validate(name)
    except MachineError as err:
        recipe = err.recipe
    plan = plan_for(recipe, get_spec(recipe.trainer), read_launch(recipe.resolve_path(recipe.accelerate_config)), parse_size("80GiB"),
                    model_shape(recipe.model.path))  # fmt: skip
    lines = script.comparison(str(name), str(run.path))
    allocated = next(line for line in lines if "peak_allocated_gib" in line)
    assert "20.50 GiB" in allocated and f"{20.5 / (plan.total / GIB):.2f}x the plan" in allocated
    assert any(line.startswith("plan total") for line in lines)
