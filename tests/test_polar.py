"""POLAR: the input layout and truncation, scoring, the loss, the synthetic Markov world, and pretraining a tiny RM."""

import json
import math

import pytest

from posttrain.errors import DataError, ModelError, RewardError
from reward_models.polar import (
    OFFICIAL_REWARD_TOKEN,
    OFFICIAL_SPLIT_TOKEN,
    REWARD_TOKEN,
    SPLIT_TOKEN,
    PolarEncoder,
    PolarLayout,
    PolarScorer,
    add_polar_tokens,
    as_text,
    bt_loss,
    pad_batch,
    sequence_scores,
    strip_think,
)


@pytest.fixture(scope="module")
def rm():
    """A tiny random sequence-classifier RM over a char tokenizer with POLAR's two tokens added."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from posttrain.models.tiny import build_tokenizer

    tokenizer = build_tokenizer("text")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    add_polar_tokens(model, tokenizer)
    return model, tokenizer


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_bt_loss_matches_hand_computation():
    import torch

    loss = bt_loss(torch.tensor([2.0]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert loss.item() == pytest.approx(0.2014, abs=1e-4)
    # Mean over pairs, no margin: equal scores give ln 2.
    assert bt_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0])).item() == pytest.approx(math.log(2))


def test_sft_wrapper_id_layout(rm):
    _, tok = rm
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=256, max_response_length=64))
    split, reward = tok.convert_tokens_to_ids([SPLIT_TOKEN, REWARD_TOKEN])
    nl = ids(tok, "\n")
    expected = [tok.bos_token_id, *ids(tok, "Q?"), *nl, *ids(tok, "ref"), split, *ids(tok, "Q?"), *nl,
                *ids(tok, "cand"), reward]  # fmt: skip
    assert enc.encode("Q?", "ref", "cand") == expected
    assert enc.text("Q?", "ref", "cand") == f"Q?\nref{SPLIT_TOKEN}Q?\ncand{REWARD_TOKEN}"


def test_pretrain_wrapper_drops_the_newline(rm):
    _, tok = rm
    enc = PolarEncoder(tok, PolarLayout("pretrain", max_length=256, max_response_length=64))
    split, reward = tok.convert_tokens_to_ids([SPLIT_TOKEN, REWARD_TOKEN])
    expected = [tok.bos_token_id, *ids(tok, "Q?ref"), split, *ids(tok, "Q?cand"), reward]
    assert enc.encode("Q?", "ref", "cand") == expected
    assert enc.text("Q?", "ref", "cand") == f"Q?ref{SPLIT_TOKEN}Q?cand{REWARD_TOKEN}"


def test_messages_are_joined_by_newlines_without_a_chat_template(rm):
    _, tok = rm
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=256, max_response_length=64))
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reference = [{"role": "assistant", "content": "Hello"}]
    assert as_text(prompt) == "Be brief.\nHi"
    assert enc.encode(prompt, reference, "Yo") == enc.encode("Be brief.\nHi", "Hello", "Yo")


def test_official_layout_reproduces_the_released_client_string():
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer("text")
    tok.add_special_tokens({"additional_special_tokens": [OFFICIAL_SPLIT_TOKEN, OFFICIAL_REWARD_TOKEN]})
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=256, max_response_length=64, official=True))
    text = enc.text("What is the capital of China?", "Beijing.", "Shanghai.")
    assert (
        text
        == "What is the capital of China?\nBeijing.<|reward|>What is the capital of China?\nShanghai.[UNUSED_TOKEN_130]"
    )
    # The whole string is tokenised at once; the reward token ends it.
    assert enc.encode("Q", "a", "b")[-1] == tok.convert_tokens_to_ids(OFFICIAL_REWARD_TOKEN)


def test_truncation_keeps_prompt_tail_and_response_heads(rm):
    _, tok = rm
    # Budget: responses cut to 4 each; BOS, split, reward and two newlines are reserved (5 with a one-token "\n"),
    # so the prompt gets (20 - 5 - 4 - 4) // 2 = 3 tokens, its last 3.
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=20, max_response_length=4))
    assert tok.bos_token_id is not None and len(ids(tok, "\n")) == 1 and enc.reserved == 5
    p, r, c = enc.parts("0123456789", "abcdefgh", "ABCDEFGH")
    assert (tok.decode(p), tok.decode(r), tok.decode(c)) == ("789", "abcd", "ABCD")
    # Short responses leave more room for the prompt: (20 - 5 - 2 - 2) // 2 = 5.
    p, _, _ = enc.parts("0123456789", "ab", "AB")
    assert tok.decode(p) == "56789"


@pytest.mark.parametrize("max_length", range(13, 40))
def test_own_layout_never_exceeds_max_length(rm, max_length):
    _, tok = rm
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=max_length, max_response_length=4))
    for prompt, ref, cand in [("0123456789" * 5, "abcdefgh", "ABCDEFGH"), ("0123456789" * 5, "a", "ABCDEFGH"),
                              ("01", "ab", "AB")]:  # fmt: skip
        assert len(enc.encode(prompt, ref, cand)) <= max_length
        chosen, rejected = enc.encode_pair(prompt, ref, cand, "x")
        assert len(chosen) <= max_length and len(rejected) <= max_length


def test_chosen_and_rejected_share_one_prompt_truncation(rm):
    """As xtuner trains the released RMs: the prompt budget is the smaller of the two, the same for both."""
    _, tok = rm
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=24, max_response_length=6))
    p, r, good, bad = enc.pair_parts("0123456789", "abcd", "ABCDEF", "X")
    assert tok.decode(p) == "6789"  # (24 - 5 - 4 - max(6, 1)) // 2 = 4
    assert enc.parts("0123456789", "abcd", "X")[0] != p  # alone, the short one would keep more of the prompt
    chosen, rejected = enc.encode_pair("0123456789", "abcd", "ABCDEF", "X")
    split = tok.convert_tokens_to_ids(SPLIT_TOKEN)
    assert chosen[: chosen.index(split)] == rejected[: rejected.index(split)]  # the same prompt + reference half
    assert chosen == enc._join(p, r, good) and rejected == enc._join(p, r, bad)


def test_layout_without_room_for_a_prompt_is_refused():
    with pytest.raises(RewardError, match="no room for the prompt"):
        PolarLayout(max_length=100, max_response_length=48)


def test_encoder_needs_the_polar_tokens():
    from posttrain.models.tiny import build_tokenizer

    with pytest.raises(ModelError, match="add_polar_tokens"):
        PolarEncoder(build_tokenizer("text"))
    # The released checkpoints' layout only builds and tokenises the client's string: no token is required.
    PolarEncoder(build_tokenizer("text"), PolarLayout(official=True, max_length=64, max_response_length=16))


def internlm2_like_tokenizer():
    """A local tokenizer shaped like InternLM2's for the official layout: `<s>` BOS added by encode, `</s>` EOS,
    `[UNUSED_TOKEN_130]` one special token, `<|reward|>` not a token of its own (split into characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("What is the capital of China? Beijing. Shanghai. <|reward|>\n0123456789abcdefghijklmnopqrstuvwxyz"
                       "ABCDEFGHIJKLMNOPQRSTUVWXYZ,!"))  # fmt: skip
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": [OFFICIAL_REWARD_TOKEN]})
    return tok


def test_official_layout_with_an_internlm2_shaped_tokenizer_reproduces_the_readme_string():
    tok = internlm2_like_tokenizer()
    assert tok.encode("ab")[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|reward|>") == tok.unk_token_id
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=16384, max_response_length=4096, official=True))
    q, ref = (
        [{"role": "user", "content": "What is the capital of China?"}],
        [{"role": "assistant", "content": "Beijing."}],
    )
    text = enc.text(q, ref, [{"role": "assistant", "content": "Beijing."}])
    assert (
        text
        == "What is the capital of China?\nBeijing.<|reward|>What is the capital of China?\nBeijing.[UNUSED_TOKEN_130]"
    )
    ids = enc.encode(q, ref, "Shanghai.")
    assert ids == tok(enc.text(q, ref, "Shanghai."))["input_ids"]  # the string, tokenised whole, as the client
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids(OFFICIAL_REWARD_TOKEN)
    # The client's truncation counts each part's BOS: "<s>" + 8 characters cut to 5 tokens keeps "<s>ABCD"; the
    # prompt ("<s>" + 20 characters) gets (40 - 4 - 5 - 5) // 2 = 13 tokens, its tail: 13 characters, no BOS.
    small = PolarEncoder(tok, PolarLayout("sft", max_length=40, max_response_length=5, official=True))
    assert small.text("0123456789abcdefghij", "ABCDEFGH", "abcdefgh") == (
        "789abcdefghij\nABCD<|reward|>789abcdefghij\nabcd[UNUSED_TOKEN_130]"
    )


def test_a_released_checkpoint_defaults_to_the_client_lengths(tmp_path):
    from reward_models.polar import OFFICIAL_MAX_LENGTH, OFFICIAL_MAX_RESPONSE_LENGTH

    assert (OFFICIAL_MAX_LENGTH, OFFICIAL_MAX_RESPONSE_LENGTH) == (16384, 4096)
    assert (PolarLayout().max_length, PolarLayout().max_response_length) == (4096, 1024)  # posttrain's own RMs


def test_added_token_embeddings_start_at_the_mean_embedding():
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer("text")
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, num_labels=1))  # fmt: skip
    old = model.get_input_embeddings().weight.detach().clone()
    assert add_polar_tokens(model, tok) == 2
    new = model.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 2 == len(tok)
    assert torch.allclose(new[-2:], old.mean(0).expand(2, -1))
    assert torch.equal(new[:-2], old)
    assert add_polar_tokens(model, tok) == 0  # idempotent: a fine-tuning stage loads a dir that has them


def test_score_is_read_at_the_reward_token_and_ignores_padding_side(rm):
    import torch

    model, tok = rm
    enc = PolarEncoder(tok, PolarLayout("sft", max_length=256, max_response_length=64))
    seqs = [enc.encode("Q", "a reference", c) for c in ("x", "a much longer candidate", "mid length")]
    alone = [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in seqs]
    with torch.no_grad():
        right = sequence_scores(model, *pad_batch(seqs, tok.pad_token_id, "right")).tolist()
        left = sequence_scores(model, *pad_batch(seqs, tok.pad_token_id, "left")).tolist()
    assert right == pytest.approx(alone, abs=1e-5)
    assert left == pytest.approx(alone, abs=1e-5)
    assert len({round(s, 4) for s in alone}) == 3  # a real function of the input, not a constant
    # The score is the head applied at the last (reward) token: dropping that token changes it.
    cut = sequence_scores(model, torch.tensor([seqs[0][:-1]]), torch.ones(1, len(seqs[0]) - 1, dtype=torch.long))
    assert cut.item() != pytest.approx(alone[0], abs=1e-4)


def test_scorer_batches_and_keeps_input_order(rm):
    model, tok = rm
    scorer = PolarScorer(model, tok, PolarLayout("sft", max_length=256, max_response_length=64), batch_size=2)
    prompts, refs = ["Q1", "Q2", "Q3", "Q4", "Q5"], ["r", "rr", "rrr", "r", "rr"]
    cands = ["c", "a long candidate", "cc", "ccc c", "c"]
    batched = scorer.score(prompts, cands, refs)
    single = [scorer.score([p], [c], [r])[0] for p, c, r in zip(prompts, cands, refs)]
    assert batched == pytest.approx(single, abs=1e-5)
    with pytest.raises(RewardError, match="reference"):
        scorer.score(prompts, cands)


def test_polar_reward_function(rm, monkeypatch):
    from reward_models import polar as polar_module
    from reward_models import resolve_reward

    model, tok = rm
    scorer = PolarScorer(model, tok, PolarLayout("sft", max_length=256, max_response_length=64))
    monkeypatch.setattr(polar_module, "_cached_scorer", lambda *a, **k: scorer)
    reward = resolve_reward("polar")
    prompts, refs = ["Q", "Q", "R"], ["Paris", "Paris", "Oslo"]
    with pytest.raises(RewardError, match="column 'reference'.*answer"):
        reward(prompts, ["Paris", "Rome", "Oslo"], model="rm", answer=refs)
    raw = reward(prompts, ["<think>maybe Rome</think> Paris", "Rome", "Oslo"], model="rm", reference=refs)
    # The reasoning block is stripped before scoring: the first completion scores as plain "Paris".
    assert raw == pytest.approx(scorer.score(prompts, ["Paris", "Rome", "Oslo"], refs), abs=1e-6)
    # normalize=self subtracts score(p, ref, ref): a completion equal to its reference scores 0.
    norm = reward(prompts, ["Paris", "Rome", "Oslo"], model="rm", reference=refs, normalize="self")
    assert norm[0] == pytest.approx(0.0, abs=1e-6) and norm[2] == pytest.approx(0.0, abs=1e-6)
    assert norm[1] == pytest.approx(raw[1] - raw[0], abs=1e-6)


@pytest.mark.parametrize(
    ("text", "official"),
    [("<think>a</think>\nanswer", "answer"),
     ("<think>a</think> answer \n ", "answer"),  # surrounding whitespace stripped, trailing too
     ("<think>never closed", "<think>never closed"),  # no block: scored as it is
     ("stray</think> answer", "stray</think> answer"),  # a </think> without <think> is not a block
     ("<think>a</think>x<think>b</think>y", "x<think>b</think>y"),  # the first block only
     ("plain ", "plain ")],  # no block: not even stripped
)  # fmt: skip
def test_strip_think_matches_the_official_reward_function(text, official):
    """Expected values follow InternLM/POLAR's `extract_thinking_content` (regex `<think>(.*?)</think>(.*)`,
    DOTALL, search; the rest `.strip()`ped; no match: the text unchanged)."""
    assert strip_think(text) == official


# ---- the synthetic Markov world -----------------------------------------------------------------------------


def test_markov_world_is_deterministic_and_rows_carry_provenance():
    from posttrain.data.markov import MarkovWorld

    world = MarkovWorld()
    rows = world.triplets("train", 50, seed=3)
    assert rows == MarkovWorld().triplets("train", 50, seed=3)
    assert rows != world.triplets("train", 50, seed=4)
    assert all(r["policy_a"] != r["policy_b"] for r in rows)
    assert {r["policy_a"] for r in rows} <= set(world.pool("train"))
    held = world.triplets("heldout", 50, seed=3)
    assert {r["policy_a"] for r in held} | {r["policy_b"] for r in held} <= set(world.pool("heldout"))
    assert not set(world.pool("heldout")) & set(world.pool("train"))
    assert any(name.startswith("ckpt-") for name in world.pool("train"))  # hard negatives are in the pool


def test_markov_ideal_reward_separates_policies():
    from posttrain.data.markov import MarkovWorld

    world = MarkovWorld()
    rows = world.triplets("heldout", 200, seed=0)
    wins = [world.ideal_reward(r["policy_a"], r["prompt"], r["chosen"])
            > world.ideal_reward(r["policy_a"], r["prompt"], r["rejected"]) for r in rows]  # fmt: skip
    assert sum(wins) / len(wins) > 0.95  # the task is learnable: a Bayes discriminator is near perfect


def test_polar_markov_is_a_synthetic_source():
    from posttrain.data import load_source

    ds = load_source({"synthetic": "polar_markov", "split": "heldout", "n": 7, "schema": "polar_triplet"})
    assert len(ds) == 7 and {"prompt", "reference", "chosen", "rejected"} <= set(ds.column_names)
    with pytest.raises(DataError, match="unknown option 'carry_drop' in synthetic task 'polar_markov'; valid: n, seed"):
        load_source({"synthetic": "polar_markov", "carry_drop": 0.5})


def test_a_larger_training_pool_keeps_the_held_out_chains():
    import numpy as np

    from posttrain.data import load_source
    from posttrain.data.markov import MarkovWorld

    small, large = MarkovWorld().chains, MarkovWorld(n_train=200).chains
    assert all(np.array_equal(small[k], large[k]) for k in small)  # held-out, first twelve, checkpoints unchanged
    assert len(MarkovWorld(n_train=200).pool("train")) == 200 + 3
    ds = load_source({"synthetic": "polar_markov", "split": "train", "n": 400, "policies": 200})
    assert len(set(ds["policy_a"])) > 100  # rows draw on the whole pool
    held = load_source({"synthetic": "polar_markov", "split": "heldout", "n": 20, "policies": 200})
    assert held.to_list() == load_source({"synthetic": "polar_markov", "split": "heldout", "n": 20}).to_list()
    with pytest.raises(DataError, match="policies must be an integer >= 2, got 1"):
        load_source({"synthetic": "polar_markov", "policies": 1})


def test_reference_only_bayes_score_by_hand():
    from posttrain.data.markov import MarkovWorld, reference_bayes_score

    world = MarkovWorld(alphabet="ab", concentration=1.0)
    # Reference "aa" after prompt "a": counts a->a = 2. Candidate "a": (2+1)/(2+2) with it, (0+1)/(0+2) without.
    assert reference_bayes_score(world, "a", "aa", "a") == pytest.approx(math.log(0.75 / 0.5))
    assert reference_bayes_score(world, "a", "aa", "b") == pytest.approx(math.log(0.25 / 0.5))
    # Candidate "aa": the second a->a also counts the first: (2+1+1)/(3+2) vs (1+1)/(1+2).
    assert reference_bayes_score(world, "a", "aa", "aa") == pytest.approx(math.log(1.5) + math.log(0.8 / (2 / 3)))


def test_reference_only_bayes_ceiling_is_below_the_ideal_and_above_the_target():
    from posttrain.data.markov import MarkovWorld, reference_bayes_score

    world = MarkovWorld()
    rows = world.triplets("heldout", 400, seed=0)

    def wins(score):
        return sum(score(r, r["chosen"]) > score(r, r["rejected"]) for r in rows) / len(rows)

    bayes = wins(lambda r, c: reference_bayes_score(world, r["prompt"], r["reference"], c))
    ideal = wins(lambda r, c: world.ideal_reward(r["policy_a"], r["prompt"], c))
    assert 0.9 < bayes < ideal  # seeing only the reference costs a few points; 0.9 is reachable in principle


# ---- pretraining a tiny RM on the Markov world (slow: ~2 min) --------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The POLAR quickstart recipe trained once (600 steps); its run dir."""
    from posttrain.registry import load_and_validate as load_recipe
    from posttrain.train import train_recipe
    from tests.conftest import REPO

    out = tmp_path_factory.mktemp("polar") / "run"
    train_recipe(load_recipe(REPO / "recipes" / "polar" / "quickstart.yaml", [f"output_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def twelve_chain_rm(tmp_path_factory):
    """The POLAR quickstart as it was before 2026-12-07, 12 training chains (it learns those chains, train-2, the GRPO
    target, among them): the RM the GRPO test was piloted with; its run dir. Without the held-out eval, which only
    this RM's test skips: the final weights are bitwise those of the run with it (checked 2026-12-07)."""
    from posttrain.registry import load_and_validate as load_recipe
    from posttrain.train import train_recipe
    from tests.conftest import REPO

    out = tmp_path_factory.mktemp("polar12") / "run"
    train_recipe(load_recipe(REPO / "recipes" / "polar" / "quickstart.yaml",
                             [f"output_dir={out}", "data.train.policies=12", "data.eval=null"]))  # fmt: skip
    return out


def _scorer(run):
    return PolarScorer.from_pretrained(str(run / "final"), wrapper="pretrain", max_length=128, max_response_length=32,
                                       batch_size=64, device="cpu")  # fmt: skip


@pytest.mark.slow
def test_pretraining_discriminates_held_out_policies(pretrained):
    import json

    before = json.loads((pretrained / "eval" / "held_out.before.json").read_text())
    after = json.loads((pretrained / "eval" / "held_out.after.json").read_text())
    train = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in train if "loss" in r and "eval/polar/loss" not in r]
    # Thresholds from one pilot (seed 0): train loss 0.39 at the end, held-out accuracy 0.75, held-out loss 0.61.
    assert sum(train_losses[-5:]) / 5 < 0.55  # ln 2 = 0.693 is chance
    assert before["eval/polar/accuracy"] < 0.6
    assert after["eval/polar/accuracy"] >= 0.7  # chains never seen in training
    assert after["eval/polar/loss"] < math.log(2)
    curve = {r["step"]: r["eval/polar/accuracy"] for r in train if "eval/polar/accuracy" in r}
    assert {0, 200, 400, 600} <= set(curve)  # before, every eval.every_steps, after


@pytest.mark.slow
def test_learned_reward_tracks_the_ideal_policy_discriminator(pretrained):
    """The central claim, testable exactly here: within a reference, learned scores rank candidates like
    log P_A(c) - log mean_B P_B(c), and candidates drift away from the target policy lose reward."""
    import statistics

    from posttrain.data.markov import MarkovWorld, mixture_curve, reference_spearman

    scorer, world = _scorer(pretrained), MarkovWorld()
    rhos = reference_spearman(world, scorer.score, split="heldout", n_refs=60)
    t_stat = statistics.mean(rhos) / (statistics.stdev(rhos) / math.sqrt(len(rhos)))
    assert statistics.mean(rhos) > 0 and t_stat > 3, (statistics.mean(rhos), t_stat)
    means = mixture_curve(world, scorer.score, mix=(0.0, 0.25, 0.5, 0.75, 1.0))
    assert all(x > y for x, y in zip(means, means[1:])), means  # falls at every step from target to other


@pytest.mark.slow
def test_trained_rm_records_its_layout_and_runs_in_the_eval_suite(pretrained, tmp_path):
    import json

    from posttrain.evaluation.store import ResultsStore
    from posttrain.evaluation.suite_runner import run_suite
    from tests.conftest import REPO

    layout = json.loads((pretrained / "final" / "polar_layout.json").read_text())
    assert layout == {"wrapper": "pretrain", "max_length": 128, "max_response_length": 32}
    store = ResultsStore(tmp_path / "results.db")
    [outcome] = run_suite(str(pretrained / "final"), REPO / "eval" / "suites" / "polar.yaml", store=store,
                          samples_dir=tmp_path / "samples", limit=300)  # fmt: skip
    held_out = json.loads((pretrained / "eval" / "held_out.after.json").read_text())
    # Same model, same held-out world, the layout read back from the dir: the suite agrees with training's eval.
    assert outcome.result.accuracy == pytest.approx(held_out["eval/polar/accuracy"], abs=0.06)
    assert outcome.result.accuracy >= 0.7
    assert store.query(benchmark="polar_markov_heldout")


@pytest.mark.slow
def test_grpo_with_polar_reward_moves_a_policy_toward_the_reference_policy(twelve_chain_rm, tmp_path):
    """GRPO with the POLAR reward, references all written by one target chain, moves a policy that starts as the
    mixture of the training chains toward the target (forward KL drops); with references from random chains
    (shuffled control) it does not. The reward is the 12-chain RM the thresholds were piloted with (with the
    200-chain quickstart RM, on one machine: KL 8.29 -> 7.95 with target references, 8.12 shuffled; docs/polar.md)."""
    pretrained = twelve_chain_rm
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.markov import MarkovWorld, continuation_rows, policy_kl, reference_rows
    from posttrain.registry import load_and_validate as load_recipe
    from posttrain.train import train_recipe

    world, target = MarkovWorld(), "train-2"
    chains = [c for c in world.pool("train") if c.startswith("train-")]

    def write(name, rows):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(name, body):
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\noutput_dir: {tmp_path / name}\n{body}")
        train_recipe(load_recipe(tmp_path / f"{name}.yaml"))
        path = tmp_path / name / "final"
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        return policy_kl(world, target, model, tok, n=300, seed=5)

    write("sft", continuation_rows(world, chains, 3000, seed=0))
    write("target_refs", reference_rows(world, target, 2000, seed=1))
    write("shuffled_refs", reference_rows(world, chains, 2000, seed=1))
    kl_start = run(
        "sft",
        f"""trainer: sft
model: {{tiny: {{task: markov, hidden_size: 64, intermediate_size: 128}}}}
data: {{train: {{path: {tmp_path / "sft.jsonl"}}}}}
training: {{max_steps: 300, per_device_train_batch_size: 64, learning_rate: 3.0e-3, logging_steps: 50, save_steps: 1000}}
""",
    )
    kl = {}
    for refs in ("target_refs", "shuffled_refs"):
        kl[refs] = run(
            f"grpo_{refs}",
            f"""trainer: grpo
model: {{path: {tmp_path / "sft" / "final"}}}
data: {{train: {{path: {tmp_path / f"{refs}.jsonl"}}}}}
rewards: [{{name: polar, kwargs: {{model: {pretrained / "final"}, reference_column: reference, batch_size: 128}}}}]
rollout: {{num_generations: 8, max_new_tokens: 17, temperature: 1.0}}
algorithm: {{loss_type: dr_grpo, beta: 0.0}}
training: {{max_steps: 80, per_device_train_batch_size: 256, learning_rate: 3.0e-5, logging_steps: 5, save_steps: 1000}}
""",
        )
    # Pilot (seed 0, lr 3e-5, 80 steps): KL 8.35 after SFT, 7.55 with target references, 8.15 with shuffled ones.
    assert kl["target_refs"] < kl_start - 0.4, (kl_start, kl)
    assert kl["shuffled_refs"] > kl["target_refs"] + 0.3, (kl_start, kl)


# ---- trainer: reward, the no-reference baseline ------------------------------------------------------------------


def _preference_rows(n, seed):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice("abcdef") for _ in range(4)) + "?"

        def answer(word):
            body = [rng.choice("abcdef") for _ in range(8)]
            body.insert(rng.randrange(9), word)
            return "".join(body)

        # Preferred answers contain "ok" somewhere, rejected ones "no": the RM must find it anywhere in the text.
        rows.append({"prompt": prompt, "chosen": answer(" ok "), "rejected": answer(" no ")})
    return rows


def _hh_transcripts(rows):
    """The same preferences as Anthropic HH rows: two whole transcripts, the prompt implicit in both."""
    turn = "\n\nHuman: {}\n\nAssistant: {}"
    return [{"chosen": turn.format(r["prompt"], r["chosen"]), "rejected": turn.format(r["prompt"], r["rejected"])}
            for r in rows]  # fmt: skip


@pytest.mark.parametrize("layout", ["columns", "hh_transcripts"])
def test_reward_trainer_learns_a_preference_and_reports_held_out_accuracy(tmp_path, layout):
    """Prompt/chosen/rejected columns, or HH transcripts split at their shared prefix (posttrain.data.chat)."""
    import json

    from posttrain.registry import load_and_validate as load_recipe
    from posttrain.train import train_recipe

    for name, n, seed in (("train", 256, 0), ("eval", 64, 1)):
        rows = _preference_rows(n, seed)
        rows = _hh_transcripts(rows) if layout == "hh_transcripts" and name == "train" else rows
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_path = tmp_path / "rm.yaml"
    recipe_path.write_text(f"""
name: rm-test
trainer: reward
model: {{tiny: {{task: text, hidden_size: 32, intermediate_size: 64}}}}
data:
  train: {{path: {tmp_path / "train.jsonl"}}}
  eval: {{path: {tmp_path / "eval.jsonl"}}}
output_dir: {tmp_path / "run"}
training: {{max_steps: 40, per_device_train_batch_size: 16, learning_rate: 3.0e-3, logging_steps: 10, save_steps: 100}}
""")
    result = train_recipe(load_recipe(recipe_path))
    assert 0.2 < result.before["eval/reward/accuracy"] < 0.8
    assert result.after["eval/reward/accuracy"] >= 0.95
    assert (tmp_path / "run" / "final" / "config.json").exists()


# ---- recipe errors and resume --------------------------------------------------------------------------------


def _polar_recipe(tmp_path, **training):
    from posttrain.registry import load_and_validate as load_recipe

    rows = [{"prompt": "ab", "reference": "cde", "chosen": "cdd", "rejected": "hhh"}] * 16
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"max_steps": 4, "per_device_train_batch_size": 4, "save_steps": 2, "logging_steps": 1, **training}
    path = tmp_path / "polar.yaml"
    path.write_text(f"""
name: polar-small
trainer: polar
model: {{tiny: {{task: markov, hidden_size: 32, intermediate_size: 64}}}}
data: {{train: {{path: {tmp_path / "t.jsonl"}}}}}
algorithm: {{stage: pretrain, max_length: 64, max_response_length: 16}}
output_dir: {tmp_path / "run"}
training: {json.dumps(settings)}
""")
    return path, load_recipe


def test_polar_recipe_errors_name_the_key(tmp_path):
    from posttrain.errors import RecipeError
    from posttrain.train import dry_run_plan

    path, load_recipe = _polar_recipe(tmp_path)
    with pytest.raises(RecipeError, match="algorithm.stage must be one of pretrain, finetune, got 'pretrian'"):
        dry_run_plan(load_recipe(path, ["algorithm.stage=pretrian"]))
    with pytest.raises(RecipeError, match="unknown key 'max_lenght' in algorithm.*max_length"):
        load_recipe(path, ["algorithm.max_lenght=64"])
    with pytest.raises(RecipeError, match="no room for the prompt"):
        dry_run_plan(load_recipe(path, ["algorithm.max_response_length=40"]))


def test_polar_row_missing_a_reference_is_named(tmp_path):
    from posttrain.train import train_recipe

    path, load_recipe = _polar_recipe(tmp_path)
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"prompt": "ab", "reference": "cd", "chosen": "c", "rejected": "h"}) + "\n"
        + json.dumps({"prompt": "ab", "chosen": "c", "rejected": "h"}) + "\n"
    )  # fmt: skip
    with pytest.raises(DataError, match="t.jsonl.*row 2 is missing field 'reference'"):
        train_recipe(load_recipe(path))


def test_polar_training_resumes_from_its_last_checkpoint(tmp_path):
    from posttrain.runs import RunDir
    from posttrain.train import train_recipe

    path, load_recipe = _polar_recipe(tmp_path)
    train_recipe(load_recipe(path))
    result = train_recipe(load_recipe(path, ["training.max_steps=6"]), resume=True)
    assert result.global_step == 6
    steps = [r["step"] for r in RunDir(tmp_path / "run").read_metrics() if "accuracy" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # logged with the POLAR metrics, no step repeated or lost


@pytest.mark.parametrize("head_init", ["zero", "normal"])
def test_a_new_value_head_starts_as_the_recipe_says_and_a_trained_one_is_kept(tmp_path, tiny_model_dir, head_init):
    from posttrain.models.reward import load_reward_model
    from posttrain.recipe import ModelSection

    zero = head_init == "zero"
    model, tokenizer = load_reward_model(str(tiny_model_dir), ModelSection(path=str(tiny_model_dir)),
                                         zero_new_head=zero)  # fmt: skip
    assert (model.score.weight.abs().sum().item() == 0) == zero  # xtuner's RewardModel zeroes a new v_head
    model.score.weight.data.fill_(0.25)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    again, _ = load_reward_model(str(tmp_path / "rm"), ModelSection(path=str(tmp_path / "rm")), zero_new_head=True)
    assert again.score.weight.detach().eq(0.25).all()


def test_head_init_is_checked_before_any_model(tmp_path):
    from posttrain.trainers.polar import PolarOptions

    with pytest.raises(ValueError, match="algorithm.head_init must be zero or normal"):
        PolarOptions(head_init="xavier")
