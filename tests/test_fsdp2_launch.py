"""FSDP2 (torch's `fully_shard` through accelerate's `fsdp_version: 2`) on 2 CPU processes over gloo, through the
shipped CPU variant recipes/accelerate/cpu/fsdp2.yaml, as users launch recipes/accelerate/fsdp2.yaml on GPUs.

accelerate 1.15 turns a launch into FSDP only from a GPU-family process state: on CPUs it dropped the FSDP plugin
and trained as DDP, saying MULTI_CPU (`posttrain.models.processes.let_accelerate_shard_on_cpu` fixes that; the first
test fails when accelerate changes). Then: the shipped configs as accelerate's own launcher reads them, equal to the
launch the memory plan reads from the file; a rehearsal keeps FSDP2. Slow: an SFT launch under FSDP2 logs the same
losses step by step as one process holding the whole batch (fp32; the tolerance of test_deepspeed_launch.py, which
covers reduction order only: measured differences 0 to 1e-8) and writes a `final/` that `from_pretrained` loads with
the same weights, scoring as the in-training evaluation did; the bytes FSDP2 holds per process equal the plan's
(scripts/fsdp2_state_bytes.py); GRPO under FSDP2 equals DDP (`manual`: CI's budget, ~50 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from posttrain.runs import RunDir
from tests.conftest import REPO

CONFIGS = REPO / "recipes" / "accelerate"
RTOL = 1e-4

# accelerate's state on one CPU process in a gloo group of 1 (LOCAL_RANK set: as under torchrun), as a launch of
# recipes/accelerate/cpu/fsdp2.yaml sets it up: without the shim, and with it.
_STATE_PROBE = """
import os, socket
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); os.environ["MASTER_PORT"] = str(s.getsockname()[1])
PartialState(cpu=True)
print(Accelerator().distributed_type.value)
AcceleratorState._reset_state(reset_partial_state=True)
from posttrain.models.processes import let_accelerate_shard_on_cpu
let_accelerate_shard_on_cpu()
PartialState(cpu=True)  # what transformers' TrainingArguments builds when posttrain sets use_cpu
accelerator = Accelerator()
print(accelerator.distributed_type.value, accelerator.is_fsdp2, PartialState().distributed_type.value, accelerator.device.type)
"""


def test_accelerate_drops_fsdp_on_cpus_unless_shown_a_gpu_state():
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _STATE_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    without, with_shim = proc.stdout.strip().splitlines()[-2:]
    # If accelerate starts to shard on CPUs by itself, the first line says FSDP: drop the shim then.
    assert without == "MULTI_CPU"
    assert with_shim == "FSDP True FSDP cpu"


@pytest.mark.parametrize("config", ["fsdp2.yaml", "cpu/fsdp2.yaml"])
def test_shipped_fsdp2_configs_are_what_accelerate_launches_and_the_plan_reads(config, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from posttrain.models.memory import launch_of_this_process, read_launch

    path = CONFIGS / config
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    for key, value in prepare_multi_gpu_env(args).items():  # the environment each rank of the launch starts with
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward, plugin.cpu_ram_efficient_loading) == (2, True, True)
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # final/ gets the full model (Trainer.save_model)
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    configured = read_launch(path)
    monkeypatch.setenv("WORLD_SIZE", str(configured.processes))
    running = launch_of_this_process()
    assert running is not None and running.kind == configured.kind == "FSDP2"
    fields = ("processes", "fsdp_version", "reshard_after_forward", "mixed_precision", "offload_params")
    assert [getattr(running, f) for f in fields] == [getattr(configured, f) for f in fields]
    expected = (8, "bf16") if config == "fsdp2.yaml" else (2, "no")
    assert (configured.processes, configured.mixed_precision) == expected


def test_a_rehearsal_keeps_fsdp2_on_two_cpu_processes(tmp_path):
    from posttrain.preflight import MachineError
    from posttrain.registry import load_and_validate
    from posttrain.rehearse import prepare_rehearsal
    from posttrain.shipped import recipes_dir

    try:
        recipe = load_and_validate(recipes_dir() / "grpo/qwen2.5-math-1.5b-gsm8k.yaml")
    except MachineError as err:  # no GPU or vLLM here: what a rehearsal stands in for
        recipe = err.recipe
    rehearsal = prepare_rehearsal(recipe, tmp_path / "r", accelerate_config=str(CONFIGS / "fsdp2.yaml"))
    launch = yaml.safe_load(rehearsal.accelerate_config.read_text())
    assert launch["distributed_type"] == "FSDP" and launch["fsdp_config"]["fsdp_version"] == 2
    assert (launch["num_processes"], launch["mixed_precision"]) == (2, "no")
    assert launch["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert any("-> FSDP2 on 2 CPU processes, fp32 (gloo)" in s for s in rehearsal.substituted)
    assert "accelerate launch, 2 processes, FSDP2 (gloo)" in rehearsal.exercised
    assert not any("FSDP" in line for line in rehearsal.not_rehearsed)


# ------------------------------------------------------------------------------------------------ launches (slow)

SFT = {
    "trainer": "sft",
    "model": {"tiny": {"task": "arithmetic", "hidden_size": 64, "intermediate_size": 128}},
    "data": {
        "train": {"synthetic": "arithmetic", "split": "train", "n": 2000},
        "eval": {"synthetic": "arithmetic", "split": "eval", "n": 40},
    },
    "rollout": {"max_new_tokens": 4},
    "eval": {"name": "arith", "every_steps": 1000},
}


def _training(per_device: int, **extra) -> dict:
    return {"max_steps": 3, "per_device_train_batch_size": per_device, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 3, **extra}  # fmt: skip


def write(tmp_path, name: str, recipe: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": 0, **recipe, "output_dir": str(tmp_path / name)}))
    return str(path)


def launch(config: str | None, recipe: str) -> None:
    """`posttrain train` under `accelerate launch --config_file recipes/accelerate/cpu/<config>.yaml`, or in one
    process (None)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu" / f"{config}.yaml")]  # fmt: skip
    cmd = [*(head if config else [sys.executable]), "-m", "posttrain", "train", recipe]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{config}: {proc.stderr[-4000:]}"
    assert proc.stdout.count("run dir:") == 1, proc.stdout  # one summary per launch, from the main process


def losses(out) -> list[float]:
    return [r["loss"] for r in RunDir(out).read_metrics() if "loss" in r and not any(k.startswith("eval") for k in r)]


def final_weights(out) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(out / "final").state_dict().items()}


def assert_same_run(out, reference) -> None:
    import torch

    assert losses(out) == pytest.approx(losses(reference), rel=RTOL, abs=1e-6)
    weights, expected = final_weights(out), final_weights(reference)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(weights[name], tensor, rtol=1e-4, atol=1e-5), name


@pytest.mark.slow
def test_sft_under_fsdp2_equals_one_process_and_its_final_scores_as_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.evaluation import evaluate, recipe_benchmarks
    from posttrain.models.loading import load_tokenizer
    from posttrain.registry import load_and_validate
    from posttrain.rollout.hf import HFGenerator

    path = write(tmp_path, "fsdp2", {**SFT, "training": _training(16)})
    launch("fsdp2", path)
    launch(None, write(tmp_path, "one", {**SFT, "training": _training(32)}))  # the same global batch
    out = tmp_path / "fsdp2"
    final = json.loads((out / "final" / "posttrain_final.json").read_text())
    assert (final["processes"], final["distributed"]) == (2, "FSDP")  # sharded, not DDP
    assert (out / "checkpoints" / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP save
    assert len(losses(out)) == 3
    assert_same_run(out, tmp_path / "one")
    (bench,) = recipe_benchmarks(load_and_validate(path))
    tokenizer = load_tokenizer(str(out / "final"))
    alone = evaluate(HFGenerator(AutoModelForCausalLM.from_pretrained(out / "final"), tokenizer, 64), bench, tokenizer)
    in_memory = json.loads((out / "eval" / "arith.after.json").read_text())  # generated by the sharded model
    assert [s["completion"] for s in in_memory["samples"]] == [s["completion"] for s in alone.samples]
    assert in_memory["accuracy"] == alone.accuracy


@pytest.mark.slow
def test_memory_plan_model_states_equal_the_bytes_fsdp2_holds(tmp_path):
    """A bf16 model under bf16 mixed precision (the GPU config's case): accelerate upcasts it to fp32 master weights
    before sharding, and the plan counts 4 + 4 + 8 bytes per parameter over the processes (within 1%: FSDP2 pads
    dim 0 of a tensor the processes do not divide)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "fsdp2.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu" / "fsdp2.yaml"),
           "--mixed_precision", "bf16", str(REPO / "scripts" / "fsdp2_state_bytes.py"), "--dtype", "bfloat16",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads(out.with_name(f"{out.name}.rank{rank}").read_text())
        assert (result["processes"], result["kind"], result["mixed_precision"]) == (2, "FSDP2", "bf16")
        assert [row["term"] for row in result["rows"]] == ["weights", "gradients", "optimizer"]
        for row in result["rows"]:
            assert row["measured"] == pytest.approx(row["plan"], rel=0.01), (rank, row)
        weights = result["rows"][0]
        assert weights["plan"] == 4 * result["params"] / 2  # fp32 master weights of a bf16 model, halved
    assert "ratio" in proc.stdout


@pytest.mark.slow
@pytest.mark.manual
def test_grpo_under_fsdp2_equals_ddp(tmp_path, tiny_model_dir, user_rewards):
    recipe = {
        "trainer": "grpo",
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 256}},
        "rewards": [{"name": "my_rewards:starts_with_seven"}],
        "rollout": {"num_generations": 4, "max_new_tokens": 3},
        "algorithm": {"loss_type": "dapo", "beta": 0.0},
        "training": _training(16, learning_rate=2e-3),  # 4 prompts x 4 samples per process
    }
    for config in ("ddp", "fsdp2"):
        launch(config, write(tmp_path, config, recipe))
    kinds = [json.loads((tmp_path / c / "final" / "posttrain_final.json").read_text())["distributed"] for c in ("ddp", "fsdp2")]  # fmt: skip
    assert kinds == ["MULTI_CPU", "FSDP"]
    assert len(losses(tmp_path / "ddp")) == 3
    assert_same_run(tmp_path / "fsdp2", tmp_path / "ddp")
