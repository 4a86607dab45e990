"""`posttrain train RECIPE --rehearse`: what a rehearsal substitutes (checked on the shipped GPU recipes without
launching), what it refuses, the planned stop after a checkpoint, and (slow) every shipped recipe rehearsed for real:
2 processes, checkpoint-1, a stop, --resume to step 2, final/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from posttrain.models.stand_ins import model_family
from posttrain.rehearse import RehearsalError, RehearsalFailed, prepare_rehearsal, run_rehearsal
from posttrain.shipped import recipes_dir
from tests.conftest import REPO

SHIPPED = sorted(str(p.relative_to(recipes_dir())) for p in recipes_dir().rglob("*.yaml")
                 if p.relative_to(recipes_dir()).parts[0] != "accelerate")  # fmt: skip
# Rehearsed in CI: one recipe per path through the rehearsal (NFT/GRPO under ZeRO-2 with dynamic sampling, GRPO with
# a POLAR reward under ZeRO-3, POLAR pretraining, SePPO on SD 1.5, and the trainers no launch test covers: RLOO, KTO,
# distillation). The others (`manual`: CI's 45-minute budget) rehearse the same code paths on other recipes; run
# them with -m manual before changing a rehearsal stand-in.
IN_CI = {"nft/qwen2.5-math-7b.yaml", "polar/grpo_qwen2.5-7b_polar.yaml", "polar/pretrain_1.5b.yaml",
         "seppo/sd15_pickapic.yaml", "rloo/arithmetic.yaml", "kto/arithmetic.yaml", "distill/arithmetic.yaml"}  # fmt: skip


def load(name: str, overrides: list[str] | None = None):
    from posttrain.preflight import MachineError
    from posttrain.registry import load_and_validate

    try:
        return load_and_validate(recipes_dir() / name, overrides or [])
    except MachineError as err:  # no GPU / vLLM / data not built yet: what a rehearsal stands in for
        return err.recipe


def rehearsed(rehearsal) -> dict:
    return yaml.safe_load(rehearsal.recipe_path.read_text())


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def deepspeed_present(monkeypatch):
    """Preparing a rehearsal only asks whether DeepSpeed is installed (a ZeRO launch without it becomes DDP): these
    tests see the ZeRO branch also where it is not (CI's oldest-set job)."""
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec
    fake = importlib.machinery.ModuleSpec("deepspeed", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == "deepspeed" else real(name, *a))


def test_nft_7b_recipe_becomes_a_tiny_qwen2_run_under_zero2_with_two_steps_from_one_generation(tmp_path,
                                                                                               deepspeed_present):  # fmt: skip
    rehearsal = prepare_rehearsal(load("nft/qwen2.5-math-7b.yaml"), tmp_path / "r")
    raw = rehearsed(rehearsal)
    config = json.loads((tmp_path / "r" / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 2
    assert raw["model"]["gradient_checkpointing"] is True and raw["model"]["dtype"] == "float32"
    launch = yaml.safe_load(rehearsal.accelerate_config.read_text())
    assert launch["distributed_type"] == "DEEPSPEED" and launch["deepspeed_config"]["zero_stage"] == 2
    assert launch["num_processes"] == 2 and launch["mixed_precision"] == "no"
    assert raw["rollout"]["backend"] == "hf" and any("vLLM" in line for line in rehearsal.not_rehearsed)
    training, algorithm = raw["training"], raw["algorithm"]
    assert (training["max_steps"], training["save_steps"]) == (2, 1)
    # The recipe takes 16 optimizer steps per generation; the rehearsal takes both of its steps from one.
    assert algorithm["steps_per_generation"] // training["gradient_accumulation_steps"] == 2
    groups = raw["rollout"]["num_generations"]
    assert (training["per_device_train_batch_size"] * 2 * algorithm["steps_per_generation"]) % groups == 0
    rows = jsonl(raw["data"]["train"]["path"])
    assert len(rows) == 32 and all(r["prompt"] and r["answer"] for r in rows)
    assert raw["eval"]["limit"] == 4 and raw["eval"]["every_steps"] == 1
    assert any("dapo-math-17k" in s and "synthetic" in s for s in rehearsal.substituted)


def test_polar_reward_gets_a_tiny_polar_stand_in_that_scores(tmp_path, deepspeed_present):
    from reward_models.polar import PolarScorer

    rehearsal = prepare_rehearsal(load("polar/grpo_qwen2.5-7b_polar.yaml"), tmp_path / "r")
    raw = rehearsed(rehearsal)
    kwargs = raw["rewards"][0]["kwargs"]
    assert kwargs["model"].startswith(str(tmp_path)) and kwargs["max_length"] == 16384
    assert any("internlm/POLAR-7B" in s and "llama" in s for s in rehearsal.substituted)  # internlm2: remote code
    scorer = PolarScorer.from_pretrained(kwargs["model"], device="cpu")
    scores = scorer.score(["What is 1 + 2?"] * 2, ["3", "4"], references=["1 + 2 = 3"] * 2)
    assert len(scores) == 2 and all(s == s for s in scores)
    assert all("reference" in row for row in jsonl(raw["data"]["train"]["path"]))
    launch = yaml.safe_load(rehearsal.accelerate_config.read_text())
    assert launch["deepspeed_config"]["zero_stage"] == 3


def test_seppo_paper_recipe_gets_a_latent_stack_pickapic_rows_and_analytic_scorers(tmp_path):
    from posttrain.data.images import load_image_rows
    from posttrain.evaluation.suite import load_suite

    rehearsal = prepare_rehearsal(load("seppo/sd15_pickapic.yaml"), tmp_path / "r")
    raw = rehearsed(rehearsal)
    assert raw["model"]["tiny"]["pixel"] is False and "path" not in raw["model"]
    assert raw["algorithm"]["num_stages"] * raw["algorithm"]["updates_per_stage"] == 2
    assert len(load_image_rows(raw["data"]["train"])) > 0
    suite = load_suite(raw["eval"]["suite"])
    assert len(suite.benchmarks) == 12  # 3 prompt sets x PickScore, HPS, ImageReward, Aesthetic
    assert all(
        b.scorer == "saturation" and b.generation["steps"] == 2 and b.data.get("prompts") for b in suite.benchmarks
    )


def test_gsm8k_suite_and_hub_eval_data_are_synthesised(tmp_path):
    from posttrain.evaluation.suite import load_suite

    rehearsal = prepare_rehearsal(load("grpo/qwen2.5-math-1.5b-gsm8k.yaml", ["eval.suite=../../eval/suites/math.yaml"]),
                                  tmp_path / "r")  # fmt: skip
    suite = load_suite(rehearsed(rehearsal)["eval"]["suite"])
    gsm8k = next(b for b in suite.benchmarks if b.name == "gsm8k")
    assert gsm8k.limit == 4 and gsm8k.generation["max_new_tokens"] == 16
    rows = jsonl(gsm8k.prompt["few_shot_data"]["path"])
    assert {"prompt", "answer", "solution"} <= set(rows[0])


def test_local_and_synthetic_sources_are_cut(tmp_path):
    rehearsal = prepare_rehearsal(load("polar/markov_pool1000.yaml"), tmp_path / "r")
    train = rehearsed(rehearsal)["data"]["train"]
    assert train["synthetic"] == "polar_markov" and train["n"] <= 128


def test_custom_schema_that_cannot_be_synthesised_is_refused_before_anything_is_built(tmp_path):
    recipe = load("grpo/qwen2.5-math-1.5b-gsm8k.yaml", ["data.train={path: someorg/custom, schema: [question, meta]}"])
    with pytest.raises(RehearsalError, match=r"data.train.*custom field list"):
        prepare_rehearsal(recipe, tmp_path / "r")
    assert not (tmp_path / "r" / "model").exists()


def test_unknown_format_is_refused(tmp_path):
    recipe = load("grpo/qwen2.5-math-1.5b-gsm8k.yaml")
    recipe.raw["data"]["train"] = {"path": "someorg/x", "format": "alpaca"}
    with pytest.raises(RehearsalError, match="format 'alpaca' cannot be synthesised"):
        prepare_rehearsal(recipe, tmp_path / "r")


def test_without_deepspeed_installed_a_zero_launch_is_rehearsed_under_ddp_and_said(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    rehearsal = prepare_rehearsal(load("nft/qwen2.5-math-7b.yaml"), tmp_path / "r")
    launch = yaml.safe_load(rehearsal.accelerate_config.read_text())
    assert launch["distributed_type"] == "MULTI_GPU" and launch["num_processes"] == 2
    assert any("ZeRO-2" in line and "posttrain[deepspeed]" in line for line in rehearsal.not_rehearsed)


def test_refused_inside_a_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RehearsalError, match="starts its own 2-process"):
        prepare_rehearsal(load("sft/arithmetic.yaml"), tmp_path / "r")


def test_model_family_from_config_known_shapes_or_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert model_family(str(tmp_path))[0] == "mistral"
    assert model_family("Qwen/Qwen2.5-Math-1.5B")[0] == "qwen2"
    assert model_family("internlm/POLAR-7B")[0] == "internlm2"
    assert model_family("someone/unknown")[0] == "llama"


def test_family_model_tokenizer_survives_reload(tmp_path):
    from transformers import AutoTokenizer

    from posttrain.models.tiny import build_byte_tokenizer, save_family_model

    path, built = save_family_model(tmp_path / "m", "qwen2")
    text = "Q: 12 + 30 = ?  é <|im_start|>user\nhi<|im_end|>"
    assert built == "qwen2"
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded(text).input_ids == build_byte_tokenizer()(text).input_ids
    assert reloaded.decode(reloaded(text).input_ids) == text
    assert save_family_model(tmp_path / "i", "internlm2")[1] == "llama"


def test_stop_after_checkpoint_leaves_only_at_its_step(tmp_path):
    code = ("from posttrain.models.processes import stop_after_checkpoint as s\n"
            "s(1); print('after 1', flush=True); s(2); print('not reached')")  # fmt: skip
    env = {**os.environ, "POSTTRAIN_STOP_AFTER_CHECKPOINT": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "after 1" in proc.stdout and "stopping after checkpoint-2" in proc.stdout
    assert "not reached" not in proc.stdout


def test_cli_rejects_rehearse_with_dry_run(capsys):
    from posttrain.cli import main

    assert main(["train", str(recipes_dir() / "sft/arithmetic.yaml"), "--rehearse", "--dry-run"]) == 2
    assert "neither --dry-run nor --resume" in capsys.readouterr().err


LAUNCHER_TRACE = """Traceback (most recent call last):
  File "/v/lib/python3.11/site-packages/accelerate/commands/launch.py", line 1300, in <module>
    main()
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Failures:
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 4242)
  error_file: <N/A>
"""


@pytest.mark.parametrize(
    ("worker", "shown", "hidden"),
    [
        ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 1\n[rank1]: ValueError: bad row 3\n",
         "ValueError: bad row 3", "ChildFailedError"),
        ("step 2 done\nterminate called without an active exception\n", "terminate called without an active", "launch.py"),
        ("RewardError: reward 'mine' raised KeyError: 'answer'\n", "RewardError: reward 'mine'", "ChildFailedError"),
    ],
    ids=["worker-traceback", "native-abort", "posttrain-error"],
)  # fmt: skip
def test_a_failed_launch_shows_the_workers_error_not_the_launchers(tmp_path, worker, shown, hidden):
    from posttrain.rehearse import tail_of_log as _tail

    log = tmp_path / "launch-2.log"
    log.write_text("loading\n" + worker + LAUNCHER_TRACE)
    tail = _tail(log)
    assert shown in tail
    if "terminate" in shown:
        assert "exitcode  : -6" in tail  # the signal, from the launcher's summary
    else:
        assert hidden not in tail.split(shown)[0]  # the worker's error comes first, not the launcher's traceback


# ------------------------------------------------------------------------------------------- slow: real launches


@pytest.mark.slow
@pytest.mark.parametrize("name", [n if n in IN_CI else pytest.param(n, marks=pytest.mark.manual) for n in SHIPPED])
def test_every_shipped_recipe_rehearses(name, tmp_path):
    pytest.importorskip("deepspeed")
    rehearsal = prepare_rehearsal(load(name), tmp_path / "r")
    run_rehearsal(rehearsal, echo=lambda line: None)
    info = json.loads((rehearsal.run_dir / "final" / "posttrain_final.json").read_text())
    assert info["step"] == 2 and info["processes"] == 2, info
    assert (rehearsal.run_dir / "checkpoints" / "checkpoint-1" / ".complete").is_file()
    assert "stopping after checkpoint-1" in (tmp_path / "r" / "launch-1.log").read_text()


@pytest.mark.slow
def test_a_failing_reward_fails_the_rehearsal_with_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text(
        "def reward(prompts, completions, **kw):\n    raise ValueError('the grader lost its table')\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load("grpo/qwen2.5-math-1.5b-gsm8k.yaml", ["rewards=[{name: 'broken_reward:reward'}]"])
    rehearsal = prepare_rehearsal(recipe, tmp_path / "r")
    with pytest.raises(RehearsalFailed, match="the grader lost its table"):
        run_rehearsal(rehearsal, echo=lambda line: None)


def test_reward_models_load_whole_inside_a_zero3_run(tmp_path):
    """Found by rehearsing recipes/polar/grpo_qwen2.5-7b_polar.yaml: under ZeRO-3 transformers partitioned the POLAR
    reward model the reward function loads, and its first call failed. Scorers now load whole."""
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from posttrain.models.stand_ins import stand_in_reward_model
    from reward_models import reward_info
    from reward_models.polar import PolarScorer
    from reward_models.scoring import whole_model_loading

    stand_in_reward_model(tmp_path / "rm", "internlm/POLAR-7B", reward_info("polar").stand_in)
    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with whole_model_loading():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()  # restored for the policy the trainer loads
        scorer = PolarScorer.from_pretrained(str(tmp_path / "rm"), device="cpu")
        assert all(p.numel() > 0 for p in scorer.model.parameters())
        assert len(scorer.score(["What is 1 + 2?"], ["3"], references=["1 + 2 = 3"])) == 1
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    del config


@pytest.mark.slow
def test_lora_is_kept_and_rehearsed_under_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    rehearsal = prepare_rehearsal(load("polar/grpo_qwen2.5-7b_polar.yaml", ["model.lora={r: 8}"]), tmp_path / "r")
    assert rehearsed(rehearsal)["model"]["lora"] == {"r": 8}
    assert any(line.startswith("LoRA r=8") for line in rehearsal.exercised)
    run_rehearsal(rehearsal, echo=lambda line: None)
    assert json.loads((rehearsal.run_dir / "final" / "posttrain_final.json").read_text())["step"] == 2
    from safetensors.torch import load_file  # the adapter ZeRO-3 saved holds whole tensors, not empty shards

    adapter = load_file(rehearsal.run_dir / "final" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())


@pytest.mark.parametrize(
    ("engine", "section", "offload", "shown"),
    [
        ("DEEPSPEED", "deepspeed_config", {"zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "nvme"},
         "-> ZeRO-3 on 2 CPU processes, fp32 (gloo); offload_optimizer_device -> none; offload_param_device -> none"),
        ("FSDP", "fsdp_config", {"fsdp_version": 2, "fsdp_offload_params": True},
         "-> FSDP2 on 2 CPU processes, fp32 (gloo); fsdp_offload_params -> false"),
    ],
)  # fmt: skip
def test_a_launch_config_is_shrunk_to_two_cpu_processes_with_offload_off(tmp_path, engine, section, offload, shown):
    """ZeRO and FSDP2 configs keep their engine; 8 GPUs on 4 machines in bf16 with offload become 2 CPU processes
    of one machine in fp32 with offload off, and the rehearsal says which offload keys it turned off."""
    from posttrain.rehearse.common import Rehearsal
    from posttrain.rehearse.launch import write_launch_config

    if engine == "DEEPSPEED":
        pytest.importorskip("deepspeed")
    given = {"distributed_type": engine, section: offload, "num_processes": 32, "num_machines": 4, "machine_rank": 3,
             "mixed_precision": "bf16", "main_process_ip": "10.0.0.1"}  # fmt: skip
    (tmp_path / "launch.yaml").write_text(yaml.safe_dump(given))
    out = Rehearsal(source=None, workdir=tmp_path, recipe_path=tmp_path / "r.yaml",
                    accelerate_config=tmp_path / "shrunk.yaml")  # fmt: skip
    write_launch_config(None, str(tmp_path / "launch.yaml"), out)
    shrunk = yaml.safe_load(out.accelerate_config.read_text())
    assert (shrunk["num_processes"], shrunk["num_machines"], shrunk["machine_rank"]) == (2, 1, 0)
    assert shrunk["mixed_precision"] == "no" and "main_process_ip" not in shrunk
    assert shrunk["distributed_type"] == engine
    kept = {k: v for k, v in offload.items() if "offload" not in k}
    assert shrunk[section] == {**kept, **{k: ("none" if engine == "DEEPSPEED" else False) for k in offload if "offload" in k}}
    assert out.substituted[-1].endswith(shown), out.substituted[-1]
    assert given["num_processes"] == 32  # the recipe's own config is not touched
