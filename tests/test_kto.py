"""`trainer: kto` (TRL KTOTrainer): unpaired rows (prompt, completion, label) and preference pairs (unpaired into one
desirable and one undesirable row) train; bad labels and data of one label kind are named before any model loads;
TRL's loss on a hand-made batch is KTO's Eq. 7-8 computed by hand; the graded-samples builder labels a model's own
completions by the grader; and (slow) KTO on the quickstart SFT model's graded samples raises held-out accuracy."""

import json
import math

import pytest

from posttrain.data import load_source
from posttrain.errors import DataError, RecipeError
from posttrain.registry import load_and_validate
from posttrain.train import dry_run_plan, train_recipe
from posttrain.trainers.kto import unpaired_rows
from tests.conftest import REPO

PROMPTS = [f"{a}+{b}=" for a in range(1, 5) for b in range(1, 5)]
UNPAIRED = [{"prompt": p, "completion": c, "label": c == "7"} for p in PROMPTS for c in ("7", "3")]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, rows, training: str = "", **algorithm) -> str:
    data = _write(tmp_path / "rows.jsonl", rows)
    path = tmp_path / "kto.yaml"
    path.write_text(
        f"name: kto-small\ntrainer: kto\noutput_dir: {tmp_path / 'run'}\n"
        "model: {tiny: {task: arithmetic, hidden_size: 32, intermediate_size: 64}}\n"
        f"data: {{train: {{path: {data}}}}}\n"
        f"algorithm: {json.dumps({'beta': 0.5, **algorithm})}\n"
        "training: {max_steps: 12, per_device_train_batch_size: 8, learning_rate: 5.0e-3, logging_steps: 4, "
        f"save_steps: 100{training}}}\n"
    )
    return str(path)


def test_kto_run_raises_desirable_over_undesirable_log_probability(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.runs import RunDir

    result = train_recipe(load_and_validate(_recipe(tmp_path, UNPAIRED)))
    assert result.global_step == 12
    run = RunDir(tmp_path / "run")
    logged = [r for r in run.read_metrics() if "rewards/margins" in r]
    assert logged and logged[-1]["rewards/margins"] > 0  # TRL's implied reward: desirable over undesirable
    assert logged[-1]["rewards/chosen"] > 0 > logged[-1]["rewards/rejected"]

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


def _unpaired(path, rows):
    return unpaired_rows(load_source({"path": str(_write(path, rows)), "schema": "unpaired"}), "test")


def test_kto_pairs_become_one_desirable_and_one_undesirable_row_with_the_shared_prompt(tmp_path, capsys):
    pairs = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
             {"prompt": "3+3=", "chosen": "6", "rejected": "6"}]  # fmt: skip
    rows = _unpaired(tmp_path / "pairs.jsonl", pairs)
    assert sorted(rows.to_list(), key=lambda r: (r["prompt"], not r["label"])) == [
        {"prompt": "1+2=", "completion": "3", "label": True},
        {"prompt": "1+2=", "completion": "4", "label": False},
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": "2+2=", "completion": "5", "label": False},
    ]
    assert "1 of 3 pairs have chosen == rejected" in capsys.readouterr().out
    with pytest.raises(DataError, match="every pair has chosen == rejected"):
        _unpaired(tmp_path / "same.jsonl", pairs[2:])


def test_kto_chosen_rejected_transcripts_are_split_then_unpaired(tmp_path):
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    ask = [turn("user", "What is 1+2?")]
    transcripts = [{"chosen": [*ask, turn("assistant", "3")], "rejected": [*ask, turn("assistant", "4")]}]
    rows = _unpaired(tmp_path / "chat.jsonl", transcripts).to_list()
    assert sorted(rows, key=lambda r: not r["label"]) == [
        {"prompt": ask, "completion": [turn("assistant", "3")], "label": True},
        {"prompt": ask, "completion": [turn("assistant", "4")], "label": False},
    ]
    text = [{"chosen": "\n\nHuman: 1+2?\n\nAssistant: 3", "rejected": "\n\nHuman: 1+2?\n\nAssistant: 4"}]
    rows = _unpaired(tmp_path / "hh.jsonl", text).to_list()
    assert {(r["prompt"], r["completion"], r["label"]) for r in rows} == {
        ("\n\nHuman: 1+2?\n\nAssistant:", " 3", True),
        ("\n\nHuman: 1+2?\n\nAssistant:", " 4", False),
    }


@pytest.mark.parametrize("label", ["yes", 2, 1])
def test_kto_label_that_is_not_a_boolean_is_named_with_its_row_at_validation(tmp_path, label):
    rows = [
        {"prompt": "1+1=", "completion": "2", "label": label},
        {"prompt": "1+1=", "completion": "3", "label": label},
    ]
    with pytest.raises(DataError, match=rf"rows.jsonl.*row 1: label must be true \(desirable\) or false.*{label!r}"):
        load_and_validate(_recipe(tmp_path, rows))


def test_kto_label_of_another_type_than_the_rest_is_named_with_its_row(tmp_path):
    rows = [*UNPAIRED[:4], {"prompt": "1+1=", "completion": "2", "label": "yes"}]
    with pytest.raises(DataError, match=r"column 'label' is a boolean in row 1 but a string in row 5"):
        load_and_validate(_recipe(tmp_path, rows))


def test_kto_data_of_one_label_kind_is_refused_before_any_model(tmp_path):
    desirable = [r for r in UNPAIRED if r["label"]]
    with pytest.raises(DataError, match=r"every row's label is true \(desirable\); .* labelled false \(undesirable\)"):
        load_and_validate(_recipe(tmp_path, desirable))
    rows = [{"prompt": "1+1=", "completion": "2"}, *UNPAIRED[:2]]
    with pytest.raises(DataError, match="row 1 is missing field 'label'"):
        load_and_validate(_recipe(tmp_path, rows))
    with pytest.raises(DataError, match="no column 'rejected'"):  # half a pair is read as a pair
        load_and_validate(_recipe(tmp_path, [{"prompt": "1+1=", "chosen": "2"}]))


def test_kto_batch_of_one_and_shuffled_sampling_are_refused_for_the_kl_estimate(tmp_path):
    with pytest.raises(RecipeError, match="per_device_train_batch_size must be >= 2 for loss_type 'kto'"):
        load_and_validate(_recipe(tmp_path, UNPAIRED), ["training.per_device_train_batch_size=1"])
    with pytest.raises(RecipeError, match="train_sampling_strategy must be 'sequential'"):
        load_and_validate(_recipe(tmp_path, UNPAIRED), ["training.train_sampling_strategy=random"])
    overrides = ["training.per_device_train_batch_size=1", "algorithm.loss_type=apo_zero_unpaired"]
    load_and_validate(_recipe(tmp_path, UNPAIRED), overrides)  # no KL term: one row per batch is fine


def test_kto_dry_run_plan_states_the_loss_weights_and_rows(tmp_path):
    lines = dry_run_plan(load_and_validate(_recipe(tmp_path, UNPAIRED, undesirable_weight=1.5)))
    assert lines[0].startswith("trainer: kto")
    method = next(line for line in lines if line.startswith("KTO ("))
    assert "kto loss, beta 0.5, desirable weight 1, undesirable weight 1.5" in method
    assert "shuffled with seed 0" in method and "8 rows per optimizer step" in method


def test_trl_kto_loss_is_eq_7_computed_by_hand(tiny_model_dir, tmp_path):
    """TRL's loss on a 4-row batch against KTO's Eq. 7-8 written out: implied rewards r = log pi - log pi_ref of each
    completion, the reference point z0 = max(0, mean over rows of the same for the neighbour's completion), desirable
    lambda_D (1 - sigmoid(beta (r - z0))), undesirable lambda_U (1 - sigmoid(beta (z0 - r))), averaged."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy, reference = (AutoModelForCausalLM.from_pretrained(tiny_model_dir) for _ in range(2))
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference, so rewards and z0 are not all zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = Dataset.from_list([{"prompt": "1+2=", "completion": "3", "label": True},
                              {"prompt": "2+5=", "completion": "9", "label": False},
                              {"prompt": "4+4=", "completion": "8", "label": True},
                              {"prompt": "3+3=", "completion": "5", "label": False}])  # fmt: skip
    beta, weight_d, weight_u = 0.5, 1.0, 1.5
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=beta, desirable_weight=weight_d,
                     undesirable_weight=weight_u, use_cpu=True, report_to="none", bf16=False,
                     gradient_checkpointing=False)  # fmt: skip
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=rows, processing_class=tokenizer)
    loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader()))).item()

    def logp(model, prompt_ids, completion_ids) -> float:
        with torch.no_grad():
            lp = model(torch.tensor([prompt_ids + completion_ids])).logits[0, :-1].log_softmax(-1)
        return sum(lp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(completion_ids))

    def reward(row, completion_key):
        ids = (row["prompt_ids"], row[completion_key])
        return logp(policy, *ids) - logp(reference, *ids)

    batch = trainer.train_dataset.to_list()
    assert [r["KL_completion_ids"] for r in batch] == [batch[-1]["completion_ids"]] + [
        r["completion_ids"] for r in batch[:-1]
    ]  # the neighbour's completion: rotated by one within the batch
    z0 = max(0.0, sum(reward(r, "KL_completion_ids") for r in batch) / len(batch))
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    losses = [
        weight_d * (1 - sigmoid(beta * (reward(r, "completion_ids") - z0)))
        if r["label"]
        else weight_u * (1 - sigmoid(beta * (z0 - reward(r, "completion_ids"))))
        for r in batch
    ]
    assert loss == pytest.approx(sum(losses) / len(losses), abs=1e-5)


class _FixedGenerator:
    """Answers each prompt with the given completions, in order."""

    tokenizer = None

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, params):
        return [self.answers[p][: params.n] for p in prompts]


def test_graded_samples_label_each_completion_by_the_grader_and_skip_empty_ones(tmp_path):
    from posttrain.evaluation.graded_samples import SampleBuild, build_graded_samples

    _write(tmp_path / "prompts.jsonl", [{"prompt": "1+2=", "answer": "3", "carry": False},
                                        {"prompt": "7+5=", "answer": "12", "carry": True}])  # fmt: skip
    generator = _FixedGenerator({"1+2=": ["3", "4"], "7+5=": ["12", " "]})
    build = SampleBuild(model="unused", data={"path": str(tmp_path / "prompts.jsonl")}, samples=2)
    counts = build_graded_samples(build, tmp_path / "out.jsonl", generator=generator)
    assert counts == {"rows": 3, "desirable": 2, "undesirable": 1, "empty": 1}
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == [
        {"prompt": "1+2=", "completion": "3", "label": True, "answer": "3", "carry": False},
        {"prompt": "1+2=", "completion": "4", "label": False, "answer": "3", "carry": False},
        {"prompt": "7+5=", "completion": "12", "label": True, "answer": "12", "carry": True},
    ]
    trained = load_source({"path": str(tmp_path / "out.jsonl"), "schema": "unpaired"})
    assert trained["label"] == [True, False, True]


@pytest.mark.slow
def test_kto_on_the_sft_models_graded_samples_raises_held_out_accuracy(tmp_path, quickstart_sft_model):
    """The issue's claim: KTO on the SFT model's own samples, labelled by correctness, raises held-out accuracy
    (measured: 0.696 -> 0.903 seed 0, 0.709 -> 0.928 seed 1; carry 0.318 -> 0.832, 0.350 -> 0.883; docs/kto.md)."""
    from posttrain.evaluation.graded_samples import SampleBuild, build_graded_samples

    samples = tmp_path / "samples.jsonl"
    build = SampleBuild(model=str(quickstart_sft_model), data={"synthetic": "arithmetic", "split": "train"},
                        max_new_tokens=5)  # fmt: skip
    build_graded_samples(build, samples)
    kto = load_and_validate(
        REPO / "recipes" / "kto/arithmetic.yaml",
        [f"model.path={quickstart_sft_model}", f"data.train.path={samples}", f"output_dir={tmp_path / 'kto'}"],
    )
    result = train_recipe(kto)
    acc, carry = "eval/arithmetic/accuracy", "eval/arithmetic/accuracy[carry=True]"
    assert result.after[acc] > result.before[acc] + 0.1
    assert result.after[carry] > result.before[carry] + 0.3
