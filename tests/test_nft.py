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


def test_rft_logs_no_negative_side_stats():
    from posttrain.trainers.rft import RFTOptions

    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([False]), torch.tensor([0.5]),
            torch.tensor([True]))  # fmt: skip
    _, stats = nft_loss(*args, RFTOptions())
    assert set(stats) == {"pos_loss"}
    _, stats = nft_loss(*args, NFTOptions())
    assert {"pos_loss", "neg_loss", "neg_clip_frac"} == set(stats)


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


# ------------------------------------------------------------------ NFT as the paper trains it: off-policy steps


def _one_group(neg_weight=1.0, aggregation="constant", loss_const=None):
    """One question, K = 2 answers of one token: the first right, the second wrong (r_hat = 1/2); pi_old gave each
    token probability 0.5, pi_theta (after some optimizer steps of the same generation) gives 0.7 and 0.45, so
    R = 1.4 and 0.9."""
    old = torch.log(torch.tensor([[0.5], [0.5]], dtype=torch.float64))
    new = torch.log(torch.tensor([[0.7], [0.45]], dtype=torch.float64)).requires_grad_()
    correct, r_hat, informative = group_correctness(torch.tensor([1.0, 0.0]), 2, 0.5)
    options = NFTOptions(aggregation=aggregation, loss_const=loss_const, neg_weight=neg_weight)
    loss, _ = nft_loss(new, old, torch.ones(2, 1), correct, r_hat, informative, options)
    (grad,) = torch.autograd.grad(loss, new)
    return loss, grad.flatten()


def test_off_policy_nft_loss_and_gradient_equal_hand_computed_values():
    import math

    loss, grad = _one_group()
    # omega = 1 - r_hat = 1/2. Positive: -omega log R1. Negative: -omega log((1 - r_hat R2) / (1 - r_hat)) with
    # v = (1 - 0.45) / 0.5 = 1.1 >= eps = 1 (not clipped). Constant aggregation: the token sum / 1000.
    assert loss.item() == pytest.approx((-0.5 * math.log(1.4) - 0.5 * math.log(1.1)) / 1000, rel=1e-12)
    # d/d log pi: positive -omega; negative omega * r_hat R2 / (1 - r_hat R2) = 0.5 * 0.45 / 0.55.
    assert grad.tolist() == pytest.approx([-0.5 / 1000, 0.5 * 0.45 / 0.55 / 1000], rel=1e-12)
    # Dr. GRPO's gradient there (A = r - r_hat = +-1/2, d/d log pi of -A R: -A R) points elsewhere: -0.7 and +0.45
    # (and PPO's clip at 1 + 0.2 zeroes the first): not proportional to NFT's (-0.5, 0.409).
    dr = torch.tensor([-0.5 * 1.4, 0.5 * 0.9], dtype=torch.float64)
    assert abs(torch.nn.functional.cosine_similarity(grad, dr, dim=0).item()) < 0.999
    on_loss, on_grad = _one_group_on_policy()
    assert on_grad.tolist() == pytest.approx([-0.5 / 1000, 0.5 / 1000], rel=1e-12)  # R = 1: Dr. GRPO's (-A)
    assert on_loss.item() == pytest.approx(0.0, abs=1e-15)


def _one_group_on_policy():
    old = torch.log(torch.tensor([[0.5], [0.5]], dtype=torch.float64))
    new = old.clone().requires_grad_()
    correct, r_hat, informative = group_correctness(torch.tensor([1.0, 0.0]), 2, 0.5)
    loss, _ = nft_loss(new, old, torch.ones(2, 1), correct, r_hat, informative, NFTOptions(aggregation="constant"))
    return loss, torch.autograd.grad(loss, new)[0].flatten()


def test_neg_weight_scales_the_negative_term_and_the_constant_is_selectable():
    _, full = _one_group()
    _, half = _one_group(neg_weight=0.5)
    assert half[0].item() == pytest.approx(full[0].item()) and half[1].item() == pytest.approx(full[1].item() / 2)
    _, none = _one_group(neg_weight=0.0)  # the official code's RFT
    assert none[1].item() == 0.0 and none[0].item() == pytest.approx(full[0].item())
    _, per_100 = _one_group(loss_const=100.0)
    assert per_100.tolist() == pytest.approx((full * 10).tolist())
    with pytest.raises(ValueError, match="neg_weight must be >= 0"):
        NFTOptions(neg_weight=-1.0)


def test_the_constant_normaliser_sums_micro_batches_instead_of_averaging(trainers):
    """dp_actor.py: each micro-batch's token sum / 1000, summed over the accumulation (not divided by it)."""
    _, nft, model = trainers
    inputs = batch()
    try:
        nft.current_gradient_accumulation_steps = 4
        nft.nft_options = NFTOptions(aggregation="constant")
        g_constant = grad(nft, model, inputs)
        nft.nft_options = NFTOptions(aggregation="sum_const", loss_const=1000.0 / len(REWARDS))
        g_sum = grad(nft, model, inputs)  # the same sum / 1000 per micro-batch, but divided by the 4 steps
    finally:
        nft.current_gradient_accumulation_steps = 1
    assert rel(g_constant, 4 * g_sum) < 1e-9


def test_dry_run_of_the_7b_recipe_shows_16_optimizer_steps_per_generation(capsys):
    from posttrain.cli import main
    from tests.conftest import REPO

    rc = main(["train", str(REPO / "recipes" / "nft" / "qwen2.5-math-7b.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 3  # valid; this machine lacks the data file, vLLM and a GPU
    assert "generation batch holds 8192 completions = 512 prompts x 16 samples (8 process(es)" in out
    assert "optimizer steps per generation: 16 (512 completions each" in out
    assert "aggregation=constant (sum / 4000 per process = 1000 x 32 / 8 process(es)" in out
    assert "rewards: dapo_strict" in out


def test_a_generation_batch_that_does_not_split_into_optimizer_steps_is_refused_with_its_numbers(
    tmp_path, tiny_model_dir, capsys
):
    import yaml

    from posttrain.cli import main
    from tests.test_trainers import grpo_recipe

    recipe = grpo_recipe(tmp_path, tiny_model_dir, reward="numeric_match", per_device_train_batch_size=8,
                         gradient_accumulation_steps=3)  # fmt: skip
    recipe.update(name="nft-bad", trainer="nft", algorithm={"beta": 0.0, "steps_per_generation": 4})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not divide into optimizer steps: 4 micro-batches per generation" in err
    assert "not a multiple of training.gradient_accumulation_steps 3" in err


@pytest.mark.parametrize("trainer", ["nft", "rft"])
def test_a_kl_term_is_refused_by_the_dry_run_before_any_model(tmp_path, tiny_model_dir, capsys, trainer):
    import yaml

    from posttrain.cli import main
    from tests.test_trainers import grpo_recipe

    recipe = grpo_recipe(tmp_path, tiny_model_dir, reward="numeric_match")
    recipe.update(name=f"{trainer}-kl", trainer=trainer, algorithm={"beta": 0.04})
    path = tmp_path / "kl.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--dry-run"]) == 2
    assert f"trainer '{trainer}' has no KL term: set algorithm.beta to 0 (got 0.04)" in capsys.readouterr().err


def test_the_constant_normaliser_keeps_the_official_per_token_weight_on_any_process_count():
    from posttrain.trainers.nft_loss import constant_normaliser

    official = NFTOptions(aggregation="constant", loss_const=1000.0, loss_const_processes=32)
    for processes in (1, 2, 8, 32, 64):
        # gradients are averaged over processes: a token weighs 1 / (C x processes)
        assert constant_normaliser(official, processes) * processes == pytest.approx(1000.0 * 32)
    assert constant_normaliser(NFTOptions(aggregation="constant", loss_const=1000.0), 8) == 1000.0  # as given
    assert constant_normaliser(NFTOptions(aggregation="constant"), 8) == 1000.0  # the official default constant
