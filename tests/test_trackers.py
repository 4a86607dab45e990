"""`training.report_to` against each tracker's real local backend (wandb offline, trackio's local store, MLflow's
SQLite store, TensorBoard event files): a short SFT run logs to it, and what the backend stored, read back with the
tracker's own reader, holds the training loss at every logging step and posttrain's held-out accuracy before
training (step 0), during it (every `eval.every_steps`) and after it (the last step), each value the one
metrics.jsonl has. Also: the trackers preflight knows are posttrain's extras, and a rehearsal leaves out one that is
not installed (the missing-package error itself: tests/test_catalogue.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from posttrain.registry import load_and_validate
from posttrain.runs import RunDir
from posttrain.train import train_recipe
from tests.conftest import REPO

STEPS, EVERY, LOGGING = 50, 20, 10  # the last step is no multiple of EVERY: "during" and "after" stay apart
ACCURACY = "eval/arith/accuracy"
NAME = "sft-trackers"


def train(tmp_path: Path, report_to: str | list[str], **training) -> RunDir:
    """A tiny SFT run whose held-out accuracy moves within 50 steps: it is scored on 16 of the 65 one-digit sums it
    trains on (0 before training, above 0 after)."""
    recipe = {
        "name": NAME,
        "trainer": "sft",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"task": "arithmetic", "hidden_size": 64, "intermediate_size": 128}},
        "data": {
            "train": {"synthetic": "arithmetic", "split": "train", "digits": 1},
            "eval": {"synthetic": "arithmetic", "split": "train", "digits": 1, "n": 16},
        },
        "rollout": {"max_new_tokens": 4},
        "eval": {"name": "arith", "every_steps": EVERY},
        "training": {
            "max_steps": STEPS,
            "per_device_train_batch_size": 32,
            "learning_rate": 3e-3,
            "logging_steps": LOGGING,
            "save_steps": STEPS,
            "report_to": report_to,
            **training,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train_recipe(load_and_validate(path))
    return RunDir(tmp_path / "run")


Series = list[tuple[int, float]]  # (step, value) pairs in step order; a value logged twice shows twice


def series(pairs) -> Series:
    return sorted(pairs, key=lambda pair: pair[0])


def jsonl_series(run: RunDir) -> tuple[Series, Series]:
    """(loss, held-out accuracy) as metrics.jsonl has them."""
    rows = run.read_metrics()
    loss = series((r["step"], r["loss"]) for r in rows if "loss" in r)
    return loss, series((r["step"], r[ACCURACY]) for r in rows if ACCURACY in r)


def assert_same_as_jsonl(run: RunDir, loss: Series, accuracy: Series, approx: bool = False) -> None:
    want_loss, want_accuracy = jsonl_series(run)
    assert [step for step, _ in want_loss] == list(range(LOGGING, STEPS + 1, LOGGING))
    assert [step for step, _ in want_accuracy] == [0, EVERY, 2 * EVERY, STEPS]  # before, during (twice), after
    assert want_accuracy[0][1] == 0 and want_accuracy[-1][1] > 0, want_accuracy  # the values tell the evals apart
    assert [step for step, _ in loss] == [step for step, _ in want_loss]
    assert [step for step, _ in accuracy] == [step for step, _ in want_accuracy]
    rel = 1e-6 if approx else 0  # TensorBoard stores float32
    assert [v for _, v in loss] == pytest.approx([v for _, v in want_loss], rel=rel, abs=0)
    assert [v for _, v in accuracy] == pytest.approx([v for _, v in want_accuracy], rel=rel, abs=0)


INSTALLED = [t for t in ("wandb", "trackio", "mlflow", "tensorboard") if importlib.util.find_spec(t) is not None]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run reporting to every installed tracker at once, each to its own local store under `tmp`: (run, tmp).
    (One run, not one per tracker: each test reads its tracker's store back against the same metrics.jsonl.)"""
    if not INSTALLED:
        pytest.skip("no tracker installed: pip install 'posttrain[wandb,trackio,mlflow,tensorboard]'")
    tmp = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_PROJECT", "posttrain-tests")
        # trackio reads TRACKIO_DIR once, when it is first imported: import it afresh for this store (the context
        # puts back any trackio modules imported before)
        mp.setenv("TRACKIO_DIR", str(tmp / "trackio"))
        for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
            mp.delitem(sys.modules, name)
        for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID"):  # local only: no Space, no server
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")  # MLflow's default local store, in tmp
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "posttrain-tests")
        mp.setenv("TENSORBOARD_LOGGING_DIR", str(tmp / "tb"))
        try:
            run = train(tmp, INSTALLED, project="posttrain-tests", run_name=NAME)
        finally:
            if "wandb" in INSTALLED:
                import wandb

                wandb.finish()  # transformers leaves the run open (it ends at exit); finishing flushes its log
        yield run, tmp, mp


@pytest.mark.slow  # the shared run: each tracker's client starts up (~20 s on 2 cores)
def test_wandb_offline_run_holds_loss_and_held_out_accuracy_at_their_steps(tracked):
    pytest.importorskip("wandb")
    run, tmp, _ = tracked
    (run_dir,) = (tmp / "wandb").glob("offline-run-*")
    # wandb's own reader of the run's .wandb transaction log; offline, it sends nothing
    records = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    history = [json.loads(line)["history"]["item"] for line in records.splitlines() if '"type":"history"' in line]
    # transformers' integration names every Trainer log key train/<key> and steps it by train/global_step
    loss = series((h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h)
    accuracy = series((h["train/global_step"], h[f"train/{ACCURACY}"]) for h in history if f"train/{ACCURACY}" in h)
    assert_same_as_jsonl(run, loss, accuracy)


@pytest.mark.slow  # the shared run: each tracker's client starts up (~20 s on 2 cores)
def test_trackio_local_store_holds_loss_and_held_out_accuracy_at_their_steps(tracked):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed: pip install 'posttrain[trackio]'")
    run, tmp, _ = tracked
    store = tmp / "trackio"
    assert (store / "posttrain-tests.db").is_file()

    def values(metric: str) -> dict[int, float]:
        """trackio's step (its own count of log calls, one per record) -> value, with trackio's CLI reader."""
        out = subprocess.run(
            [sys.executable, "-m", "trackio.cli", "get", "metric", "--project", "posttrain-tests", "--run", NAME,
             "--metric", metric, "--json"], capture_output=True, text=True, check=True, timeout=60,
            env={**os.environ, "TRACKIO_DIR": str(store)},
        ).stdout  # fmt: skip
        return {v["step"]: v["value"] for v in json.loads(out)["values"]}

    global_step = values("train/global_step")  # logged with every record: trackio's step -> the Trainer's step
    loss = series((global_step[s], v) for s, v in values("train/loss").items())
    accuracy = series((global_step[s], v) for s, v in values(f"train/{ACCURACY}").items())
    assert_same_as_jsonl(run, loss, accuracy)


@pytest.mark.slow  # the shared run: each tracker's client starts up (~20 s on 2 cores)
def test_mlflow_sqlite_store_holds_loss_and_held_out_accuracy_at_their_steps(tracked):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run, tmp, _ = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("posttrain-tests").experiment_id])
    assert found.info.run_name == NAME and found.info.status == "FINISHED"

    def history(metric: str) -> Series:
        return series((m.step, m.value) for m in client.get_metric_history(found.info.run_id, metric))

    assert_same_as_jsonl(run, history("loss"), history(ACCURACY))  # MLflow keeps the Trainer's own key names


@pytest.mark.slow  # the shared run: each tracker's client starts up (~20 s on 2 cores)
def test_tensorboard_event_files_hold_loss_and_held_out_accuracy_at_their_steps(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, tmp, _ = tracked
    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()

    def scalars(tag: str) -> Series:
        return series((e.step, e.value) for e in events.Scalars(tag))

    assert_same_as_jsonl(run, scalars("train/loss"), scalars(f"train/{ACCURACY}"), approx=True)


def test_every_tracker_preflight_checks_is_an_extra_named_as_report_to_names_it():
    from posttrain.preflight import TRACKER_MODULES

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(TRACKER_MODULES) <= set(project["optional-dependencies"])
    assert not [d for d in project["dependencies"] if d.split(">")[0].split("=")[0] in TRACKER_MODULES]  # extras only


def test_a_rehearsal_leaves_out_a_tracker_that_is_not_installed_and_says_so(tmp_path, monkeypatch):
    from posttrain.preflight import MachineError
    from posttrain.rehearse import prepare_rehearsal

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))  # fmt: skip
    recipe = {"name": "r", "trainer": "sft", "model": {"tiny": {"task": "arithmetic"}},
              "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 64}},
              "training": {"max_steps": 4, "report_to": ["tensorboard"]}}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(MachineError, match=r"pip install 'posttrain\[tensorboard\]'") as err:
        load_and_validate(path)
    rehearsal = prepare_rehearsal(err.value.recipe, tmp_path / "reh")
    assert yaml.safe_load(rehearsal.recipe_path.read_text())["training"]["report_to"] == "none"
    assert any("logging to tensorboard" in line for line in rehearsal.not_rehearsed)


@pytest.mark.slow  # two tiny runs, each starting wandb's offline client (~25 s on 2 cores)
def test_two_recipes_in_one_process_get_two_wandb_runs(tmp_path, monkeypatch):
    """transformers leaves a wandb run open at train end; run_training finishes it, so a second recipe trained in
    the same process (the quickstart's stages) opens its own run instead of logging into the first."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # wandb reads WANDB_DIR once per process: an earlier test's setup would keep its own dir
    try:
        for stage in ("one", "two"):
            (tmp_path / stage).mkdir()
            train(tmp_path / stage, "wandb", max_steps=10, save_steps=10, logging_steps=5, run_name=stage)
            assert wandb.run is None  # finished, not left for the next recipe
    finally:
        wandb.teardown()  # the next wandb user in this process reads its own settings
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 2  # two runs, two run ids
