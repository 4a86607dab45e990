"""NFT / RFT: the loss equals (Dr.) GRPO's gradient on-policy and only there, its clipped negative term, its optimum,
RFT = SFT on correct answers, a short run that learns, and guards on the TRL internals the trainer relies on."""

import copy
import inspect

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.runs import RunDir
from posttrain.train import train_recipe
from posttrain.trainers.nft import NFTOptions, trainer_class
from posttrain.trainers.nft_loss import group_correctness, nft_loss
from posttrain.trainers.nft_trainer import CORRECT, INFORMATIVE, RHAT

K, T = 4, 5  # answers per question, completion length
# Groups with r_hat 0.25 and 0.75 (same std, so TRL's n-1 std + 1e-4 is one scalar away from sqrt(r(1-r))),
# plus an all-correct and an all-wrong group that must carry no gradient.
REWARDS = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)
STD_FACTOR = (0.25 * 0.75) ** 0.5 / ((K / (K - 1) * 0.25 * 0.75) ** 0.5 + 1e-4)


def _reward(completions, **kwargs):
    return [0.0 for _ in completions]


@pytest.fixture(scope="module")
def trainers(tiny_model_dir, tmp_path_factory):
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("nft")), use_cpu=True, report_to="none", beta=0.0, bf16=False,
        per_device_train_batch_size=16, num_generations=K, max_completion_length=T, temperature=1.0,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": ["1+1="] * 16})
    kw = dict(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tokenizer)
    grpo, nft = GRPOTrainer(**kw), trainer_class()(**kw)
    for t in (grpo, nft):
        t.current_gradient_accumulation_steps = 1
    model.train()
    return grpo, nft, model


def batch(rewards=REWARDS, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(rewards)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        mask[i, 2 + i % (T - 2) :] = 0  # varied lengths: 2..4 tokens
    mean = rewards.view(-1, K).mean(1, keepdim=True)
    std = rewards.view(-1, K).std(1, keepdim=True)  # TRL: n-1 std, + 1e-4
    correct, r_hat, informative = group_correctness(rewards, K, 0.5)
    return {
        "prompt_ids": torch.randint(3, 15, (n, 3), generator=g),
        "prompt_mask": torch.ones(n, 3, dtype=torch.long),
        "completion_ids": torch.randint(3, 15, (n, T), generator=g),
        "completion_mask": mask,
        "adv_grpo": ((rewards.view(-1, K) - mean) / (std + 1e-4)).view(-1),
        "adv_dr": (rewards.view(-1, K) - mean).view(-1),
        CORRECT: correct,
        RHAT: r_hat,
        INFORMATIVE: informative,
        "num_items_in_batch": mask.sum(),
    }


def grad(trainer, model, inputs) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = trainer._compute_loss(model, inputs)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=False)])


def grpo_grad(trainers, loss_type, inputs, scale):
    grpo, _, model = trainers
    grpo.loss_type = loss_type
    return grad(grpo, model, {**inputs, "advantages": inputs["adv_grpo" if scale else "adv_dr"]})


def nft_grad(trainers, inputs, **options):
    _, nft, model = trainers
    nft.nft_options = NFTOptions(**options)
    return grad(nft, model, inputs)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_nft_gradient_equals_grpo_on_policy(trainers):
    inputs = batch()
    # omega = sqrt((1-r)/r) with per-sequence token means = TRL "grpo" with group std scaling (Eq. 11 of the paper).
    g_nft = nft_grad(trainers, inputs, weight="sqrt", aggregation="seq_mean")
    g_grpo = grpo_grad(trainers, "grpo", inputs, scale=True)
    assert rel(STD_FACTOR * g_nft, g_grpo) < 1e-6
    # omega = 1 - r with sum / (B * max_completion_length) = TRL "dr_grpo" without std scaling.
    g_nft = nft_grad(trainers, inputs, weight="one_minus_rhat", aggregation="sum_const")
    g_dr = grpo_grad(trainers, "dr_grpo", inputs, scale=False)
    assert rel(g_nft, g_dr) < 1e-6
    # Token mean over the batch = TRL "bnpo" (and dapo on one process).
    g_nft = nft_grad(trainers, inputs, weight="one_minus_rhat", aggregation="token_mean")
    assert rel(g_nft, grpo_grad(trainers, "bnpo", inputs, scale=False)) < 1e-6


def test_nft_gradient_differs_from_grpo_when_it_should(trainers):
    inputs = batch()
    g_grpo = grpo_grad(trainers, "grpo", inputs, scale=True) / STD_FACTOR
    g_dr = grpo_grad(trainers, "dr_grpo", inputs, scale=False)
    # eps > 1 clips the on-policy negative value v = 1 up to eps: the negative gradient shrinks by 1/eps.
    assert rel(nft_grad(trainers, inputs, weight="sqrt", aggregation="seq_mean", neg_clip_eps=1.5), g_grpo) > 1e-2
    # The other weighting: no square root (1 - r) against GRPO, square root against Dr. GRPO.
    assert rel(nft_grad(trainers, inputs, weight="one_minus_rhat", aggregation="seq_mean"), g_grpo) > 1e-2
    assert rel(nft_grad(trainers, inputs, weight="sqrt", aggregation="sum_const"), g_dr) > 1e-2
    # An all-correct group left in: r_hat clamps to 0.98 and its positive term moves the policy.
    assert (
        rel(nft_grad(trainers, inputs, weight="sqrt", aggregation="seq_mean", mask_uninformative=False), g_grpo) > 1e-3
    )
    # Off-policy (pi_old = the model before one optimizer step): the implicit negative's gradient is no longer GRPO's.
    _, nft, model = trainers
    before = copy.deepcopy(model.state_dict())
    old, _, _ = nft._get_per_token_logps_and_entropies(
        model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), T,
    )  # fmt: skip
    try:
        nft.nft_options = NFTOptions(weight="one_minus_rhat")
        loss = nft._compute_loss(model, inputs)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 5.0 * p.grad
                p.grad = None
        off = {**inputs, "old_per_token_logps": old.detach()}
        g_nft = nft_grad(trainers, off, weight="one_minus_rhat", aggregation="sum_const")
        assert rel(g_nft, grpo_grad(trainers, "dr_grpo", off, scale=False)) > 1e-3
    finally:
        model.load_state_dict(before)


def test_negative_value_is_clipped_forward_with_straight_through_gradient():
    r_hat, eps = 0.5, 1.0
    for ratio in (1.5, 3.0):  # v = (1 - r R)/(1 - r) = 0.5 (below eps) and -1 (log undefined without the clip)
        logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
        loss, stats = nft_loss(
            logp, torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([False]), torch.tensor([r_hat]),
            torch.tensor([True]), NFTOptions(weight="one", neg_clip_eps=eps, loss_const=1.0, rhat_clamp=0.0),
        )  # fmt: skip
        loss.backward()
        assert loss.item() == 0.0  # -log(max(v, eps)) = -log(1)
        # d/dlogR of -log(v_st) = -(dv/dlogR) / max(v, eps) = r R / ((1 - r) max(v, eps)): the unclipped dv.
        assert logp.grad.item() == pytest.approx(r_hat * ratio / ((1 - r_hat) * eps))
        assert stats["neg_clip_frac"].item() == 1.0


def test_nft_optimum_is_old_policy_restricted_to_correct_answers():
    torch.manual_seed(0)
    pi_old = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    correct = torch.tensor([True, False, True, True, False, False])
    r_hat = pi_old[correct].sum().expand(6)
    logits = torch.log(pi_old).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    options = NFTOptions(weight="one", loss_const=1.0, rhat_clamp=0.0)
    for _ in range(3000):
        # One "sequence" per answer, each weighted by pi_old (the mask): the exact expectation over a ~ pi_old.
        logp = torch.log_softmax(logits, 0)[:, None]
        loss, _ = nft_loss(logp, torch.log(pi_old)[:, None], pi_old[:, None], correct, r_hat, torch.ones(6).bool(),
                           options)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    target = torch.where(correct, pi_old, 0.0) / pi_old[correct].sum()
    assert torch.allclose(torch.softmax(logits, 0), target, atol=2e-3), (torch.softmax(logits, 0), target)


def test_rft_gradient_equals_sft_on_correct_answers(trainers):
    _, nft, model = trainers
    inputs = batch()
    g_rft = nft_grad(trainers, inputs, weight="one", negatives=False, mask_uninformative=False)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -T - 1 : -1]
    nll = -torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    keep = inputs["completion_mask"] * inputs[CORRECT][:, None]
    sft = (nll * keep).sum() / (len(ids) * T)  # sum_const normaliser: B x max_completion_length
    g_sft = torch.cat([g.flatten() for g in torch.autograd.grad(sft, params)])
    assert rel(g_rft, g_sft) < 1e-6


def test_group_correctness_counts_truncated_as_wrong():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.2, 0.7])
    correct, r_hat, informative = group_correctness(rewards, 3, 0.5, torch.tensor([0, 1, 0, 0, 0, 0]).bool())
    assert correct.tolist() == [True, False, False, True, False, True]
    assert r_hat.tolist() == pytest.approx([1 / 3] * 3 + [2 / 3] * 3)
    _, _, informative = group_correctness(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2, 0.5)
    assert informative.tolist() == [False, False, False, False]


def test_nft_run_raises_reward(tmp_path, tiny_model_dir, user_rewards):
    from tests.test_trainers import grpo_recipe, load

    recipe = grpo_recipe(tmp_path, tiny_model_dir, max_steps=30, save_steps=30)
    recipe.update(name="nft-test", trainer="nft", algorithm={"beta": 0.0, "weight": "one_minus_rhat"})
    recipe["output_dir"] = str(tmp_path / "nft")
    train_recipe(load(tmp_path, recipe))
    logged = [r for r in RunDir(tmp_path / "nft").read_metrics() if "reward" in r]
    rewards = [r["reward"] for r in logged]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.25 and last > first + 0.3, rewards
    assert {"nft/rhat_mean", "nft/masked_group_frac", "nft/neg_clip_frac", "nft/pos_loss"} <= set(logged[0])


def test_trl_internals_nft_relies_on():
    """Fails loudly on a TRL upgrade that renames or reshapes what NFTTrainer overrides or reads."""
    from trl import GRPOTrainer

    def params(name):
        return list(inspect.signature(getattr(GRPOTrainer, name)).parameters)

    assert params("_compute_loss") == ["self", "model", "inputs"]
    assert params("_generate_and_score_completions") == ["self", "inputs"]
    assert params("_calculate_rewards") == ["self", "inputs", "prompts", "completions", "completion_ids_list"]
    assert params("_get_per_token_logps_and_entropies")[:5] == [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep"
    ]  # fmt: skip
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    # Rewards come gathered over processes from _calculate_rewards, weighted by reward_weights, in group order.
    assert "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in src
    assert "self.reward_weights" in src and "process_slice" in src
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_per_token_logps"):
        assert f'"{key}"' in src, key
    loss_src = inspect.getsource(GRPOTrainer._compute_loss)
    # TRL scales each micro-batch loss itself (Trainer's scaling is off); NFTTrainer does the same.
    assert "self.current_gradient_accumulation_steps" in loss_src and 'inputs.get("old_per_token_logps")' in loss_src
    init_src = inspect.getsource(GRPOTrainer.__init__)
    for attr in ("self.eos_token_ids", "self.num_generations", "self.num_generations_eval", "self.max_completion_length",
                 "self.reward_weights", "self._metrics"):  # fmt: skip
        assert attr in init_src, attr
