"""The --dry-run memory plan: parameter counts against real models, model states against DeepSpeed's own
estimator functions and hand-computed bytes, the verdict and the knob it names."""

from __future__ import annotations

import re
from dataclasses import replace

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


def test_fsdp2_model_states_by_hand():
    p, n, layer, unit = 1_000_000_000, 8, 40_000_000, 200_000_000  # unit: the output head + final norm

    def terms(launch: Launch, trainable: int = p, weight_bytes: int = 2, mixed: bool = True) -> dict[str, float]:
        found = model_state_terms(p, trainable, weight_bytes, launch, mixed_precision=mixed, layer=layer,
                                  output_unit=unit)  # fmt: skip
        return {t.name: t.bytes for t in found}

    fsdp2 = Launch(processes=n, fsdp_version=2, mixed_precision="bf16")
    # bf16 mixed precision: accelerate upcasts the trainable weights to fp32 before sharding, and gradients and AdamW's
    # m and v follow their dtype; gathered for compute in 16 bit: the output unit (kept from forward to backward) and
    # two layers (the one running, the next prefetched), and the unsharded gradients of the output unit and a layer
    assert terms(fsdp2) == {
        "weights (fp32 master)": 4 * p / n,
        "gradients (32-bit)": 4 * p / n,
        "optimizer (AdamW m, v)": 8 * p / n,
        "gathered weights (16-bit)": 2 * (unit + 2 * layer),
        "gathered gradients (16-bit)": 2 * (unit + layer),
    }
    sharded = lambda found: sum(v for k, v in found.items() if not k.startswith("gathered"))  # noqa: E731
    # 16 bytes per parameter over the processes, where ZeRO-3 holds 20 (its 16-bit weights and gradients as well)
    assert sharded(terms(fsdp2)) == 16 * p / n
    zero3 = model_state_terms(p, p, 2, Launch(processes=n, zero_stage=3), largest_layer=0)
    assert sum(t.bytes for t in zero3) == 20 * p / n
    # without resharding after forward every unit stays gathered until its backward: the whole model, 16-bit
    assert terms(replace(fsdp2, reshard_after_forward=False))["gathered weights (16-bit)"] == 2 * p
    # fp32, no mixed precision (the CPU config): 4 bytes for everything
    assert terms(Launch(processes=2, fsdp_version=2), weight_bytes=4, mixed=False) == {
        "weights (32-bit)": 4 * p / 2,
        "gradients (32-bit)": 4 * p / 2,
        "optimizer (AdamW m, v)": 8 * p / 2,
        "gathered weights (32-bit)": 4 * (unit + 2 * layer),
        "gathered gradients (32-bit)": 4 * (unit + layer),
    }
    # a bf16 model without mixed precision stays bf16: 2 + 2 + 4 bytes per parameter over the processes
    assert sharded(terms(Launch(processes=n, fsdp_version=2), mixed=False)) == 8 * p / n
    # LoRA: the frozen base stays 16-bit and sharded, the adapters are fp32 with their gradients and states
    t = 10**6
    lora = terms(fsdp2, trainable=t)
    assert lora["weights (fp32 master)"] == (4 * t + 2 * (p - t)) / n
    assert (lora["gradients (32-bit)"], lora["optimizer (AdamW m, v)"]) == (4 * t / n, 8 * t / n)
    assert lora["gathered gradients (16-bit)"] == 0
    # fsdp_offload_params: the shards and the optimizer step live on the CPU; the gathered units still on the device
    offloaded = terms(replace(fsdp2, offload_params=True, offload_optimizer=True))
    assert sharded(offloaded) == 0 and offloaded["gathered weights (16-bit)"] == 2 * (unit + 2 * layer)


def test_dry_run_plans_fsdp2_per_process_from_its_accelerate_config(capsys):
    from posttrain.models.memory import plan_for, read_launch
    from posttrain.preflight import MachineError
    from posttrain.registry import get_spec, load_and_validate

    shape = KNOWN_SHAPES["Qwen/Qwen2.5-1.5B"]
    h, kv, inter, vocab = 1536, 256, 8960, 151936  # its config.json (2 KV heads of 128)
    # a decoder layer: q and o (h x h), k and v (h x kv), the q/k/v biases, gate/up/down (h x I), two norms
    layer = 2 * h * h + 2 * h * kv + (h + 2 * kv) + 3 * h * inter + 2 * h
    assert shape.layer_params == layer == 46_797_824
    assert shape.output_unit_params == vocab * h + h  # tied: the embedding is the head's own tensor
    assert shape.params == vocab * h + 28 * layer + h
    path = recipes_dir() / "grpo" / "qwen2.5-math-1.5b-gsm8k.yaml"
    overrides = ["accelerate_config=../accelerate/fsdp2.yaml", "algorithm.beta=0.04"]  # beta > 0: a reference model
    try:
        recipe = load_and_validate(path, overrides)
    except MachineError as err:  # no GPU / vLLM here
        recipe = err.recipe
    launch = read_launch(recipe.resolve_path(recipe.accelerate_config))
    assert (launch.kind, launch.processes, launch.mixed_precision, launch.reshard_after_forward) == ("FSDP2", 8, "bf16", True)  # fmt: skip
    plan = plan_for(recipe, get_spec("grpo"), launch, 80 * GIB, shape)
    p = shape.params
    got = {t.name: t.bytes for t in plan.terms}
    assert got["weights (fp32 master)"] == got["gradients (32-bit)"] == 4 * p / 8  # bf16 model, upcast to fp32
    assert got["optimizer (AdamW m, v)"] == 8 * p / 8
    assert got["gathered weights (16-bit)"] == 2 * (vocab * h + h + 2 * layer)
    assert got["gathered gradients (16-bit)"] == 2 * (vocab * h + h + layer)
    assert got["reference model"] == 2 * p / 8  # TRL shards it as it does the policy
    main(["train", str(path), "--dry-run", *[a for o in overrides for a in ("--set", o)]])
    out = capsys.readouterr().out
    assert "memory plan per device (8 process(es), FSDP2, from " in out
    assert re.search(rf"weights \(fp32 master\) +{4 * p / 8 / GIB:.2f} GiB  exact; sharded over 8", out)


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
