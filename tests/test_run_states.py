"""Run-dir states: a failed run restarts without cleanup, a finished run resumed changes nothing, a torn checkpoint
is skipped for the newest whole one, metrics.jsonl holds each step once after a resume, and kill -9 + --resume
ends bitwise equal to an uninterrupted run without training past max_steps."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.registry import load_and_validate as load_recipe
from posttrain.runs import COMPLETE_MARKER, FINAL_INFO, SUPERSEDED, RunDir, checkpoint_problem, mark_complete
from posttrain.train import train_recipe
from tests.conftest import REPO


def sft_recipe(out, max_steps=4, save_steps=2, **training) -> dict:
    return {
        "name": "states",
        "trainer": "sft",
        "seed": 0,
        "output_dir": str(out),
        "model": {"tiny": {"task": "arithmetic", "hidden_size": 32, "intermediate_size": 64}},
        "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 400}},
        "rollout": {"max_new_tokens": 4},
        "training": {
            "max_steps": max_steps,
            "save_steps": save_steps,
            "logging_steps": 1,
            "per_device_train_batch_size": 16,
            "learning_rate": 3e-3,
            **training,
        },  # fmt: skip
    }


def write(tmp_path, data) -> str:
    path = tmp_path / f"{data['name']}-{abs(hash(data['output_dir']))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def weights(run_path) -> dict[str, torch.Tensor]:
    return load_file(str(run_path / "final" / "model.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


# --------------------------------------------------------------------------------------- the states, on files


def _checkpoint(run: RunDir, step: int, marked: bool = True):
    path = run.checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 64)
    (path / "trainer_state.json").write_text("{}")
    if marked:
        mark_complete(path)
    return path


def test_states_follow_what_the_dir_holds(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.state(4).kind == "new"
    run.path.mkdir()
    (run.path / "recipe.resolved.yaml").write_text("name: r\n")
    assert run.state(4).kind == "new"  # died while loading: nothing of a run yet
    run.metrics_path.write_text('{"step": 1, "loss": 1.0}\n')
    assert run.state(4).kind == "failed"
    _checkpoint(run, 3, marked=False)  # a save that never finished does not count
    assert run.state(4).kind == "failed"
    two = _checkpoint(run, 2)
    state = run.state(4)
    assert state.kind == "interrupted" and state.checkpoint == two
    assert state.skipped == [
        f"skipping {run.checkpoints / 'checkpoint-3'}: no .complete marker (its save did not finish)"
    ]
    run.final.mkdir()
    (run.final / FINAL_INFO).write_text(json.dumps({"step": 2}))
    assert run.state(2).kind == "finished" and run.state(2).final_step == 2
    assert run.state(4).kind == "interrupted"  # final/ at 2 of 4 planned: a run being extended
    assert run.state(None).kind == "finished"  # planned in epochs: final/ means done
    for path in run.checkpoints.iterdir():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    short = run.state(4)
    assert short.kind == "finished"
    with pytest.raises(PosttrainError, match="final/ at step 2 but no complete checkpoint to continue it to step 4"):
        run.check(short, resume=True, planned_steps=4)
    with pytest.raises(PosttrainError, match="already holds a finished run"):
        run.check(short, resume=False, planned_steps=4)


def test_a_checkpoint_missing_a_listed_file_or_its_weights_is_torn(tmp_path):
    run = RunDir(tmp_path / "r")
    one, two, three = _checkpoint(run, 1), _checkpoint(run, 2), _checkpoint(run, 3, marked=False)
    assert checkpoint_problem(one) is None
    (two / "model.safetensors").unlink()  # marked complete, then lost its weights (rotation, a full disk)
    assert "missing or changed size (model.safetensors)" in checkpoint_problem(two)
    assert run.last_checkpoint() == one
    skipped = run.state(9).skipped
    assert [line.split(":")[0] for line in skipped] == [f"skipping {three}", f"skipping {two}"]
    # A file cut short is caught by its size.
    (one / "trainer_state.json").write_text("{")
    assert "trainer_state.json" in checkpoint_problem(one) and run.last_checkpoint() is None
    # A marker from before the manifest (a bare timestamp) vouches for the save only: the weights are looked for.
    old = _checkpoint(run, 4, marked=False)
    (old / COMPLETE_MARKER).write_text(str(time.time()))
    assert checkpoint_problem(old) is None
    (old / "model.safetensors").unlink()
    assert checkpoint_problem(old) == "its weights are missing"


def test_rows_past_the_resumed_checkpoint_move_to_the_side_file(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    rows = [{"step": 0, "stage": "s:before", "eval/a/accuracy": 0.1}]
    rows += [{"step": s, "stage": "s", "loss": 1.0 / s} for s in range(1, 7)]
    rows += [{"step": 6, "stage": "s:after", "eval/a/accuracy": 0.5}]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # a cut line
    assert run.supersede_metrics_after(4) == 3
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2, 3, 4]
    side = [json.loads(line) for line in (run.path / SUPERSEDED).read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in side] == [(5, "s"), (6, "s"), (6, "s:after")]
    assert all(r["superseded"]["resumed_from"] == 4 for r in side)
    assert run.supersede_metrics_after(4) == 0  # nothing left past the checkpoint


# ------------------------------------------------------------------------------- the states, on real runs


def test_a_failed_run_restarts_from_scratch_with_its_files_moved_aside(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "stage": "states:before"}\n')  # died before its first checkpoint
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # a half-written one
    result = train_recipe(load_recipe(write(tmp_path, sft_recipe(out))))
    assert result.global_step == 4 and (out / "final" / "model.safetensors").exists()
    (aside,) = tmp_path.glob("run.failed-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 0, "stage": "states:before"}\n'
    assert (aside / "checkpoints" / "checkpoint-2").is_dir()
    assert f"its files were moved to {aside}" in capsys.readouterr().err
    assert [r["step"] for r in RunDir(out).read_metrics() if "loss" in r] == [1, 2, 3, 4]
    # The same with --resume: nothing to continue, so it starts over too (moved aside again, not refused).
    (out / "final").rename(tmp_path / "kept-final")
    for path in (out / "checkpoints").glob("checkpoint-*"):
        (path / COMPLETE_MARKER).unlink()
    assert train_recipe(load_recipe(write(tmp_path, sft_recipe(out))), resume=True).global_step == 4
    assert len(list(tmp_path.glob("run.failed-*"))) == 2


def test_resume_of_a_finished_run_changes_no_file(tmp_path, capsys):
    out = tmp_path / "run"
    path = write(tmp_path, sft_recipe(out))
    assert main(["train", path]) == 0
    before = digest(out)
    assert main(["train", path, "--resume"]) == 0
    assert "finished at step 4: nothing to resume, nothing was changed" in capsys.readouterr().out
    assert digest(out) == before
    assert not (out / "checkpoints" / "checkpoint-5").exists()
    assert main(["train", path]) == 2  # without --resume: refused, naming it finished
    assert "already holds a finished run (final/ at step 4)" in capsys.readouterr().err
    assert digest(out) == before


def test_resume_from_a_checkpoint_at_max_steps_writes_final_without_training_past_it(tmp_path):
    out = tmp_path / "run"
    path = write(tmp_path, sft_recipe(out))
    train_recipe(load_recipe(path))
    reference = weights(out)
    import shutil

    shutil.rmtree(out / "final")  # killed after the last checkpoint, before final/ was swapped in
    result = train_recipe(load_recipe(path), resume=True)
    assert result.global_step == 4 and not (out / "checkpoints" / "checkpoint-5").exists()
    assert_bitwise_equal(weights(out), reference)
    info = json.loads((out / "final" / FINAL_INFO).read_text())
    assert info == {"step": 4, "machines": 1, "processes": 1, "distributed": "NO"}


def test_a_torn_newest_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(tmp_path, capsys):
    straight = tmp_path / "straight"
    train_recipe(load_recipe(write(tmp_path, sft_recipe(straight))))
    out = tmp_path / "run"
    path = write(tmp_path, sft_recipe(out))
    train_recipe(load_recipe(path))
    import shutil

    shutil.rmtree(out / "final")
    (out / "checkpoints" / "checkpoint-4" / "model.safetensors").unlink()  # marked complete, weights gone
    result = train_recipe(load_recipe(path), resume=True)
    err = capsys.readouterr().err
    assert f"warning: skipping {out / 'checkpoints' / 'checkpoint-4'}" in err and "model.safetensors" in err
    assert result.global_step == 4 and (out / "checkpoints" / "torn-checkpoint-4").is_dir()
    assert_bitwise_equal(weights(out), weights(straight))
    run = RunDir(out)
    steps = [r["step"] for r in run.read_metrics() if "loss" in r]
    assert steps == [1, 2, 3, 4]  # each step once: the first attempt's 3 and 4 were superseded
    side = [json.loads(line) for line in (out / SUPERSEDED).read_text().splitlines()]
    assert [r["step"] for r in side if "loss" in r] == [3, 4] and side[0]["superseded"]["resumed_from"] == 2


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume_is_bitwise_equal_and_stops_at_max_steps(tmp_path):
    """A real `posttrain train` process killed with SIGKILL once its first checkpoint is complete, plus a random
    delay (so the kill lands in a step, a log write or the next save), then `--resume`d."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "posttrain", "train"]
    straight = write(tmp_path, sft_recipe(tmp_path / "straight", max_steps=60, save_steps=10))
    assert subprocess.run([*cmd, straight], env=env, capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "run"
    path = write(tmp_path, sft_recipe(out, max_steps=60, save_steps=10))
    proc = subprocess.Popen([*cmd, path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "checkpoint-10" / COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and first.exists()  # killed mid-run, after a complete checkpoint
    resumed = subprocess.run([*cmd, path, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(weights(out), weights(tmp_path / "straight"))
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert max(int(n.rsplit("-", 1)[1]) for n in names if n.startswith("checkpoint-")) == 60
    steps = [r["step"] for r in RunDir(out).read_metrics() if "loss" in r]
    assert steps == list(range(1, 61))
    again = subprocess.run([*cmd, path, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing was changed" in again.stdout


@pytest.mark.parametrize(
    ("files", "loadable"),
    [
        (["config.json", "model.safetensors"], True),
        (["config.json", "model.safetensors.index.json"], True),  # sharded
        (["adapter_config.json", "adapter_model.safetensors"], True),  # a LoRA run's final/
        (["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"], True),  # SD layout
        (["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"], True),
        (["config.json"], False),  # no weights
        (["adapter_config.json"], False),
        (["model_index.json", "unet/config.json"], False),  # a unet without weights
        (["posttrain_final.json"], False),
    ],
    ids=[
        "whole",
        "sharded",
        "lora",
        "pipeline",
        "pixel-stack",
        "config-only",
        "adapter-only",
        "unet-no-weights",
        "marker-only",
    ],  # fmt: skip
)
def test_loadable_model_dir_knows_each_final_layout(tmp_path, files, loadable):
    from posttrain.runs import loadable_model_dir

    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert loadable_model_dir(tmp_path) is loadable
