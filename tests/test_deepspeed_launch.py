"""Two-process launches on the CPU, as users launch on GPUs: DDP and DeepSpeed ZeRO-2/ZeRO-3 through the shipped
CPU variants of the accelerate configs (recipes/accelerate/cpu/), every trainer on tiny models.

Per trainer: DDP, ZeRO-2 and ZeRO-3 runs from the same seed and the same global batch finish, print one summary,
log the same losses step by step (fp32; the tolerance covers reduction order only: measured differences are ~1e-6)
and write one consolidated `final/` that `from_pretrained` loads, with the same weights. SFT is also checked
against one process holding the whole batch, and its `final/` against the in-training evaluation. ZeRO-3 is
killed with SIGKILL after a checkpoint and resumed; SePPO runs under DDP. Slow: about 20 s per launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from posttrain.runs import COMPLETE_MARKER, RunDir
from tests.conftest import REPO
from tests.test_shared_run_dir import kill_node

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

CONFIGS = REPO / "recipes" / "accelerate" / "cpu"
RTOL = 1e-4


def _training(per_device: int, **extra) -> dict:
    return {"max_steps": 3, "per_device_train_batch_size": per_device, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 3, **extra}  # fmt: skip


def _rl(trainer: str, model_dir, algorithm: dict) -> dict:
    return {
        "trainer": trainer,
        "model": {"path": str(model_dir)},
        "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 256}},
        "rewards": [{"name": "my_rewards:starts_with_seven"}],
        "rollout": {"num_generations": 4, "max_new_tokens": 3},
        "algorithm": algorithm,
        "training": _training(16, learning_rate=2e-3),  # 4 prompts x 4 samples per process
    }


def _preferences(tmp_path) -> str:
    import random

    rng = random.Random(0)
    rows = [{"prompt": f"{rng.randint(0, 99)}?", "chosen": f"ok {rng.randint(0, 999)}", "rejected": f"no {rng.randint(0, 999)}"}
            for _ in range(64)]  # fmt: skip
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe_for(trainer: str, tmp_path, model_dir) -> dict:
    if trainer == "sft":
        return {
            "trainer": "sft",
            "model": {"tiny": {"task": "arithmetic", "hidden_size": 64, "intermediate_size": 128}},
            "data": {
                "train": {"synthetic": "arithmetic", "split": "train", "n": 2000},
                "eval": {"synthetic": "arithmetic", "split": "eval", "n": 40},
            },  # fmt: skip
            "rollout": {"max_new_tokens": 4},
            "eval": {"name": "arith", "every_steps": 1000},
            "training": _training(16),
        }
    if trainer == "grpo":
        return _rl("grpo", model_dir, {"loss_type": "dapo", "beta": 0.0})
    if trainer == "nft":
        return _rl("nft", model_dir, {})
    if trainer == "rft":
        return _rl("rft", model_dir, {})
    if trainer == "dpo":  # beta > 0: a reference model, prepared by TRL for DeepSpeed too
        return {
            "trainer": "dpo",
            "model": {"path": str(model_dir)},
            "data": {
                "train": {
                    "synthetic": "arithmetic",
                    "split": "train",
                    "n": 512,
                    "carry_drop": 1.0,
                    "columns": {"chosen": "answer", "rejected": "completion"},
                }
            },  # fmt: skip
            "algorithm": {"beta": 0.1},
            "training": _training(8),
        }
    if trainer == "polar":
        return {
            "trainer": "polar",
            "model": {"tiny": {"task": "markov", "hidden_size": 64, "intermediate_size": 128}},
            "data": {"train": {"synthetic": "polar_markov", "split": "train", "n": 200}},
            "algorithm": {"stage": "pretrain", "max_length": 128, "max_response_length": 32},
            "training": _training(8),
        }
    if trainer == "reward":
        return {
            "trainer": "reward",
            "model": {"tiny": {"task": "text", "hidden_size": 32, "intermediate_size": 64}},
            "data": {"train": {"path": _preferences(tmp_path)}},
            "training": _training(8),
        }
    raise AssertionError(trainer)


def write(tmp_path, name: str, recipe: dict, out) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": 0, **recipe, "output_dir": str(out)}))
    return str(path)


def launch(config: str | None, recipe: str, *extra: str, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml")]
    cmd = [*(head if config else [sys.executable]), "-m", "posttrain", "train", recipe, *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{config}: {proc.stderr[-4000:]}"
    assert proc.stdout.count("run dir:") == 1, proc.stdout  # one summary per launch, from the main process
    return proc


def losses(out) -> list[float]:
    return [r["loss"] for r in RunDir(out).read_metrics() if "loss" in r and not any(k.startswith("eval") for k in r)]


def final_weights(out, trainer: str) -> dict:
    import transformers

    auto = {"polar": "AutoModelForSequenceClassification", "reward": "AutoModelForSequenceClassification"}
    model = getattr(transformers, auto.get(trainer, "AutoModelForCausalLM")).from_pretrained(out / "final")
    return {k: v.float() for k, v in model.state_dict().items()}


def launch_all(trainer: str, tmp_path, model_dir) -> dict:
    """The trainer's recipe launched under DDP, ZeRO-2 and ZeRO-3: {config: (recipe path, run dir)}."""
    recipe = recipe_for(trainer, tmp_path, model_dir)
    runs = {}
    for config in ("ddp", "zero2", "zero3"):
        runs[config] = (write(tmp_path, f"{trainer}-{config}", recipe, tmp_path / config), tmp_path / config)
        launch(config, runs[config][0])
    return runs


@pytest.fixture(scope="module")
def sft_launches(tmp_path_factory, tiny_model_dir):
    """SFT's three launches, shared by the ZeRO-vs-DDP check and the one-process/in-memory-eval check."""
    return launch_all("sft", tmp_path_factory.mktemp("sft_launches"), tiny_model_dir)


# In CI: one trainer per path through the launch (SFT; GRPO's generation; DPO's reference model; POLAR's sequence
# classifier). NFT and RFT run GRPO's trainer, reward POLAR's model class: `manual` (CI's 45-minute budget).
_SAME_PATH = pytest.mark.manual


@pytest.mark.parametrize(
    "trainer",
    ["sft", "grpo", pytest.param("nft", marks=_SAME_PATH), pytest.param("rft", marks=_SAME_PATH), "dpo", "polar",
     pytest.param("reward", marks=_SAME_PATH)],
)  # fmt: skip
def test_zero2_and_zero3_match_ddp(trainer, request, tmp_path, tiny_model_dir, user_rewards):
    import torch

    runs = (
        request.getfixturevalue("sft_launches") if trainer == "sft" else launch_all(trainer, tmp_path, tiny_model_dir)
    )
    outs = {config: out for config, (_, out) in runs.items()}
    kinds = {c: json.loads((o / "final" / "posttrain_final.json").read_text()) for c, o in outs.items()}
    assert {c: (k["processes"], k["distributed"]) for c, k in kinds.items()} == {
        "ddp": (2, "MULTI_CPU"), "zero2": (2, "DEEPSPEED ZeRO-2"), "zero3": (2, "DEEPSPEED ZeRO-3")}  # fmt: skip
    ddp = losses(outs["ddp"])
    assert len(ddp) == 3 and all(x == x for x in ddp)
    reference = final_weights(outs["ddp"], trainer)
    for config in ("zero2", "zero3"):
        assert losses(outs[config]) == pytest.approx(ddp, rel=RTOL, abs=1e-6), config
        weights = final_weights(outs[config], trainer)  # one consolidated HF dir, also from ZeRO-3's shards
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.allclose(weights[name], tensor, rtol=1e-4, atol=1e-5), (config, name)


def test_sft_launches_equal_one_process_and_final_scores_as_in_memory(tmp_path, tiny_model_dir, sft_launches):
    from transformers import AutoModelForCausalLM

    from posttrain.evaluation import evaluate, recipe_benchmarks
    from posttrain.models.loading import load_tokenizer
    from posttrain.registry import load_and_validate
    from posttrain.rollout.hf import HFGenerator

    recipe = recipe_for("sft", tmp_path, tiny_model_dir)
    one = {**recipe, "training": {**recipe["training"], "per_device_train_batch_size": 32}}  # the same global batch
    launch(None, write(tmp_path, "sft-one", one, tmp_path / "one"))
    path, zero3 = sft_launches["zero3"]
    assert losses(zero3) == pytest.approx(losses(tmp_path / "one"), rel=RTOL)
    final = zero3 / "final"
    (bench,) = recipe_benchmarks(load_and_validate(path))
    tokenizer = load_tokenizer(str(final))
    alone = evaluate(HFGenerator(AutoModelForCausalLM.from_pretrained(final), tokenizer, 64), bench, tokenizer)
    in_memory = json.loads((zero3 / "eval" / "arith.after.json").read_text())  # ZeRO-3, sharded
    assert [s["completion"] for s in in_memory["samples"]] == [s["completion"] for s in alone.samples]
    assert in_memory["accuracy"] == alone.accuracy


def test_zero3_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, tiny_model_dir):
    import torch

    recipe = recipe_for("sft", tmp_path, tiny_model_dir)
    recipe["training"] = {**recipe["training"], "max_steps": 8, "save_steps": 2}
    launch("zero3", write(tmp_path, "straight", recipe, tmp_path / "straight"))
    out = tmp_path / "killed"
    path = write(tmp_path, "killed", recipe, out)
    proc = launch("zero3", path, wait=False)
    mark = out / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER
    deadline = time.monotonic() + 600
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_node(proc)  # the launcher and both ranks (torchrun starts each in a session of its own)
    assert mark.exists() and not (out / "final" / "config.json").exists()  # killed mid-run, after checkpoint-4
    launch("zero3", path, "--resume")
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), rel=RTOL)
    assert [r["step"] for r in RunDir(out).read_metrics() if "loss" in r and "eval/arith/accuracy" not in r] == list(
        range(1, 9)
    )
    straight, resumed = final_weights(tmp_path / "straight", "sft"), final_weights(out, "sft")
    assert all(torch.allclose(resumed[k], straight[k], rtol=1e-5, atol=1e-6) for k in straight)


def test_seppo_runs_under_ddp_on_two_processes(tmp_path):
    from tests.test_seppo import seppo_recipe

    recipe = seppo_recipe(tmp_path, name="seppo-ddp")  # 2 stages x 2 updates, batch 2 x 2 accumulation per process
    path = tmp_path / "seppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch("ddp", str(path))
    run = RunDir(tmp_path / "seppo-ddp")
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer
    assert all(r["loss"] == r["loss"] for r in rows)
    assert (run.final / "model_index.json").exists()
    assert sorted(p.name for p in (run.path / "pool").iterdir()) == [f"entry-{i}.safetensors" for i in range(3)]


@pytest.mark.parametrize("stage", [2, 3])
def test_memory_plan_model_states_equal_the_bytes_deepspeed_holds(stage, tmp_path):
    """scripts/zero_state_bytes.py reads DeepSpeed's ZeRO optimizer on every rank during a step: weights, the
    gradient partition and the fp32 optimizer states each equal the plan's term within 1%."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / f"zero{stage}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"zero{stage}.yaml"),
           str(REPO / "scripts" / "zero_state_bytes.py"), "--hidden", "96", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads(out.with_name(f"{out.name}.rank{rank}").read_text())
        assert (result["processes"], result["zero_stage"]) == (2, stage)
        for row in result["rows"]:
            assert row["measured"] == pytest.approx(row["plan"], rel=0.01), (rank, row)
    assert "weights" in proc.stdout and "ratio" in proc.stdout
