"""`trainer: dpo` (TRL DPOTrainer): recipe errors read like the other trainers', identical pairs are dropped, a
short run moves the policy's log-likelihood towards the chosen answers, and (slow) DPO from the quickstart's SFT
model on (correct sum, carry-dropped sum) pairs raises held-out accuracy."""

import json

import pytest

from posttrain.errors import DataError, RecipeError
from posttrain.registry import load_and_validate
from posttrain.train import dry_run_plan, train_recipe
from tests.conftest import REPO


def _recipe(tmp_path, rows, **algorithm) -> str:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "dpo.yaml"
    path.write_text(
        f"name: dpo-small\ntrainer: dpo\noutput_dir: {tmp_path / 'run'}\n"
        "model: {tiny: {task: arithmetic, hidden_size: 32, intermediate_size: 64}}\n"
        f"data: {{train: {{path: {data}}}}}\n"
        f"algorithm: {json.dumps({'beta': 0.5, **algorithm})}\n"
        "training: {max_steps: 12, per_device_train_batch_size: 8, learning_rate: 5.0e-3, logging_steps: 4, "
        "save_steps: 100}\n"
    )
    return str(path)


PAIRS = [{"prompt": f"{a}+{b}=", "chosen": "7", "rejected": "3"} for a in range(1, 5) for b in range(1, 5)]


def test_dpo_recipe_typo_in_beta_is_named_with_the_nearest_key(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'bta' in algorithm \(did you mean 'beta'\?\)"):
        load_and_validate(_recipe(tmp_path, PAIRS), ["algorithm.bta=0.1"])
    with pytest.raises(RecipeError, match="'beta' is an algorithm option"):
        load_and_validate(_recipe(tmp_path, PAIRS), ["training.beta=0.1"])


def test_dpo_rows_missing_chosen_or_rejected_are_named(tmp_path):
    rows = [*PAIRS[:3], {"prompt": "1+1=", "chosen": "2"}]
    with pytest.raises(DataError, match=r"pairs.jsonl.*row 4 is missing field 'rejected'"):
        train_recipe(load_and_validate(_recipe(tmp_path, rows)))
    rows = [{"prompt": "1+1=", "answer": "2"}]
    with pytest.raises(DataError, match=r"pairs.jsonl.*no column 'chosen'.*map one with data.train.columns"):
        train_recipe(load_and_validate(_recipe(tmp_path, rows)))


def test_dpo_pairs_with_identical_answers_are_dropped_and_all_identical_is_an_error(tmp_path):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}] * 4
    with pytest.raises(DataError, match="every pair has chosen == rejected; DPO needs pairs that differ"):
        train_recipe(load_and_validate(_recipe(tmp_path, rows)))


def test_dpo_dry_run_plan_states_the_loss_and_pairs(tmp_path):
    lines = dry_run_plan(load_and_validate(_recipe(tmp_path, PAIRS, loss_type="sigmoid")))
    assert lines[0].startswith("trainer: dpo")
    assert any("DPO (sigmoid loss, beta 0.5)" in line and "8 pairs per optimizer step" in line for line in lines)
    assert "steps: 12 optimizer steps" in lines


def test_dpo_run_raises_the_chosen_over_rejected_margin(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.runs import RunDir

    result = train_recipe(load_and_validate(_recipe(tmp_path, PAIRS)))
    assert result.global_step == 12
    run = RunDir(tmp_path / "run")
    logged = [r for r in run.read_metrics() if "rewards/margins" in r]
    assert logged and logged[-1]["rewards/margins"] > 0  # TRL's implicit reward: chosen over rejected

    def logp(model_dir, answer):  # log-prob of `answer` after "1+2=" (one character token)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        ids = tok("1+2=", return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1].log_softmax(-1)
        return logits[tok.convert_tokens_to_ids(answer)].item()

    base, final = run.path / "base_model", run.final
    assert logp(final, "7") - logp(final, "3") > logp(base, "7") - logp(base, "3") + 1.0
    assert (run.path / "report.md").exists()


@pytest.mark.slow
def test_dpo_from_the_quickstart_sft_model_raises_held_out_accuracy(tmp_path, quickstart_sft_model):
    """The issue's claim: DPO on (correct, carry-dropped) pairs from the SFT model raises held-out accuracy
    (measured: 0.693 -> 0.888 seed 0, 0.704 -> 0.930 seed 1; docs/dpo.md)."""
    dpo = load_and_validate(
        REPO / "recipes" / "dpo/arithmetic.yaml",
        [f"model.path={quickstart_sft_model}", f"output_dir={tmp_path / 'dpo'}"],
    )
    result = train_recipe(dpo)
    acc, carry = "eval/arithmetic/accuracy", "eval/arithmetic/accuracy[carry=True]"
    assert result.after[acc] > result.before[acc] + 0.1
    assert result.after[carry] > result.before[carry] + 0.3
