"""Dynamic sampling (grpo, nft, rft): with it on, no generation batch (hence no optimizer batch) holds a group whose
rewards do not vary; with it off, TRL's batch is unchanged; the merge pads and counts like TRL; the TRL internals it
wraps are guarded."""

import inspect

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.trainers.dynamic_sampling import DynamicSamplingOptions, concat, select, varied_groups

K = 4  # answers per prompt


def starts_with_seven(completions, **kwargs):
    """A random tiny model starts with "7" about 1 time in 19: most groups of 4 get four equal rewards."""
    return [1.0 if c.startswith("7") else 0.0 for c in completions]


@pytest.fixture(scope="module")
def parts(tiny_model_dir, tmp_path_factory):
    from trl import GRPOConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    out = str(tmp_path_factory.mktemp("ds"))

    def config(**changes):
        return GRPOConfig(**{"output_dir": out, "use_cpu": True, "report_to": "none", "beta": 0.0, "bf16": False,
                             "per_device_train_batch_size": 32, "num_generations": K, "max_completion_length": 3,
                             "temperature": 1.0, "seed": 0, **changes})  # fmt: skip

    args = config()
    prompts = [f"{a}+{b}=" for a in range(10, 40) for b in range(10, 13)]
    data = Dataset.from_dict({"prompt": prompts})
    kwargs = dict(
        model=model, reward_funcs=starts_with_seven, args=args, train_dataset=data, processing_class=tokenizer
    )
    model.train()
    kwargs["make_config"] = config
    return kwargs, tokenizer, prompts


def _trainer_kwargs(kwargs):
    return {k: v for k, v in kwargs.items() if k != "make_config"}


def _inputs(prompts):
    return [{"prompt": p} for p in prompts[:8] for _ in range(K)]


def _groups_vary(output, tokenizer) -> list[bool]:
    texts = tokenizer.batch_decode(output["completion_ids"], skip_special_tokens=True)
    rewards = torch.tensor(starts_with_seven(texts)).view(-1, K)
    return (rewards.max(dim=1).values > rewards.min(dim=1).values).tolist()


def test_with_dynamic_sampling_every_group_of_the_batch_varies(parts):
    from posttrain.trainers.grpo import trainer_class

    kwargs, tokenizer, prompts = parts
    trainer = trainer_class()(**_trainer_kwargs(kwargs))
    torch.manual_seed(0)
    assert not all(_groups_vary(trainer._generate_and_score_completions(_inputs(prompts)), tokenizer))  # it matters
    trainer.dynamic_options = DynamicSamplingOptions(dynamic_sampling=True, max_generation_rounds=12)
    for seed in range(3):
        torch.manual_seed(seed)
        out = trainer._generate_and_score_completions(_inputs(prompts))
        assert out["completion_ids"].size(0) == out["prompt_ids"].size(0) == out["advantages"].size(0) == 8 * K
        assert all(_groups_vary(out, tokenizer))
        # Each group is one prompt's K answers, its prompt intact after left padding across rounds.
        decoded = tokenizer.batch_decode(out["prompt_ids"], skip_special_tokens=True)
        assert all(len(set(decoded[i : i + K])) == 1 and decoded[i] in prompts for i in range(0, 8 * K, K))
        assert (out["advantages"].view(-1, K).abs().sum(dim=1) > 0).all()  # no all-zero-advantage group
        assert out["num_items_in_batch"] == out["completion_mask"].sum()  # recounted after the filter, as TRL does
    metrics = trainer._metrics["train"]
    assert max(metrics["dynamic_sampling/rounds"]) > 1 and sum(metrics["dynamic_sampling/dropped_groups"]) > 0
    assert all(0 < f <= 1 for f in metrics["dynamic_sampling/fill_rate"])


def test_with_dynamic_sampling_off_the_batch_is_trls_own(parts):
    from trl import GRPOTrainer

    from posttrain.trainers.grpo import trainer_class

    kwargs, _, prompts = parts
    plain, ours = GRPOTrainer(**_trainer_kwargs(kwargs)), trainer_class()(**_trainer_kwargs(kwargs))
    ours.dynamic_options = DynamicSamplingOptions(dynamic_sampling=False)
    torch.manual_seed(3)
    a = plain._generate_and_score_completions(_inputs(prompts))
    torch.manual_seed(3)
    b = ours._generate_and_score_completions(_inputs(prompts))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert "dynamic_sampling/rounds" not in ours._metrics["train"]


def test_nft_and_rft_batches_with_dynamic_sampling_hold_informative_groups_only(parts):
    from posttrain.trainers.nft import NFTOptions, trainer_class
    from posttrain.trainers.nft_trainer import CORRECT, INFORMATIVE, RHAT
    from posttrain.trainers.rft import RFTOptions

    kwargs, tokenizer, prompts = parts
    # NFT counts a truncated answer as wrong: longer completions and a commoner "correct" so groups can be mixed.
    kwargs = {**kwargs, "args": kwargs["make_config"](max_completion_length=8), "reward_funcs": starts_low}
    for options in (NFTOptions(dynamic_sampling=True), RFTOptions(dynamic_sampling=True)):
        trainer = trainer_class()(**_trainer_kwargs(kwargs))
        trainer.nft_options = trainer.dynamic_options = options
        torch.manual_seed(1)
        out = trainer._generate_and_score_completions(_inputs(prompts))
        assert out[INFORMATIVE].all()  # RFT's all-correct groups are dropped too (the official accuracy filter)
        assert ((out[RHAT] > 0) & (out[RHAT] < 1)).all() and out[CORRECT].size(0) == 8 * K
        assert out[CORRECT].view(-1, K).any(dim=1).all() and (~out[CORRECT]).view(-1, K).any(dim=1).all()


def starts_low(completions, **kwargs):
    return [1.0 if c[:1] in "01234" else 0.0 for c in completions]


def test_varied_groups_select_and_concat():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert varied_groups(rewards, 2).tolist() == [False, False, True, True, False, False]
    a = {"prompt_ids": torch.tensor([[0, 5], [0, 6]]), "completion_ids": torch.tensor([[7], [8]]),
         "completion_mask": torch.tensor([[1], [1]]), "advantages": torch.tensor([0.5, -0.5]),
         "num_items_in_batch": torch.tensor(2)}  # fmt: skip
    b = {"prompt_ids": torch.tensor([[4, 5, 6]]), "completion_ids": torch.tensor([[9, 9, 1]]),
         "completion_mask": torch.tensor([[1, 1, 0]]), "advantages": torch.tensor([1.0]),
         "num_items_in_batch": torch.tensor(2)}  # fmt: skip
    merged = concat([a, b], pad_id=0)
    assert merged["prompt_ids"].tolist() == [[0, 0, 5], [0, 0, 6], [4, 5, 6]]  # prompts padded on the left
    assert merged["completion_ids"].tolist() == [[7, 0, 0], [8, 0, 0], [9, 9, 1]]  # completions on the right
    assert merged["completion_mask"].tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert merged["advantages"].tolist() == [0.5, -0.5, 1.0]
    picked = select(merged, torch.tensor([2, 0]))
    assert picked["advantages"].tolist() == [1.0, 0.5] and picked["num_items_in_batch"] == 2


def test_a_recipe_run_logs_dynamic_sampling_every_step(tmp_path, tiny_model_dir, user_rewards):
    from posttrain.runs import RunDir
    from posttrain.train import train_recipe
    from tests.test_trainers import grpo_recipe, load

    recipe = grpo_recipe(tmp_path, tiny_model_dir, max_steps=4, per_device_train_batch_size=64, save_steps=4)
    recipe["algorithm"].update(dynamic_sampling=True, max_generation_rounds=4)
    result = train_recipe(load(tmp_path, recipe))
    logged = [r for r in RunDir(tmp_path / "grpo").read_metrics() if "dynamic_sampling/rounds" in r]
    assert result.global_step == 4 and len(logged) == 4
    assert all(1 <= r["dynamic_sampling/rounds"] <= 4 and 0 <= r["dynamic_sampling/fill_rate"] <= 1 for r in logged)


def test_trl_internals_dynamic_sampling_relies_on():
    from trl import GRPOTrainer

    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters) == [
        "self", "inputs", "prompts", "completions", "completion_ids_list"]  # fmt: skip
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    # Rewards gathered over processes in group order; num_items_in_batch = the gathered sum of the loss mask.
    assert "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in src
    assert "num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()" in src
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "generation_batch = self._generate_and_score_completions(generation_batch)" in prepare
