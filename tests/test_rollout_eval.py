"""The transformers rollout backend and the held-out evaluation runner."""

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.evaluation import Benchmark, evaluate
from posttrain.rollout import SamplingParams, truncate_at_stop
from posttrain.rollout.hf import HFGenerator


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return HFGenerator(model, tokenizer, batch_size=8)


PROMPTS = ["1+1=", "47+85=", "9+9=", "123+4=", "5="]


def test_batched_greedy_equals_one_at_a_time(generator):
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    batched = generator.generate(PROMPTS, params)
    single = [generator.generate([p], params)[0] for p in PROMPTS]
    assert batched == single  # left padding must not change what a prompt generates


def test_n_samples_per_prompt_and_seeding(generator):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=7)
    first = generator.generate(PROMPTS, params)
    assert [len(s) for s in first] == [4] * len(PROMPTS)
    assert first == generator.generate(PROMPTS, params)  # same seed, same samples
    other = generator.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=8))
    assert other != first
    assert len({s for group in first for s in group}) > len(PROMPTS)  # sampling, not greedy


def test_truncate_at_stop():
    assert truncate_at_stop("12\nQ: next", ("\n", "Q:")) == "12"
    assert truncate_at_stop("12", ("\n",)) == "12"


class Oracle:
    """A generator that answers from a lookup table (to test grading without a trained model)."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, params):
        return [[self.answers[p]] * params.n for p in prompts]


def test_evaluate_grades_and_slices():
    rows = Dataset.from_list(
        [{"prompt": "47+85=", "answer": "132", "carry": True}, {"prompt": "12+34=", "answer": "46", "carry": False},
         {"prompt": "19+19=", "answer": "38", "carry": True}, {"prompt": "11+11=", "answer": "22", "carry": False}]
    )  # fmt: skip
    oracle = Oracle({"47+85=": "122", "12+34=": "46", "19+19=": "38", "11+11=": "22"})
    result = evaluate(oracle, Benchmark("arith", rows, slice_column="carry"))
    assert result.accuracy == 0.75 and result.n == 4
    assert result.slices == {"carry=False": {"accuracy": 1.0, "n": 2}, "carry=True": {"accuracy": 0.5, "n": 2}}
    assert result.metrics()["eval/arith/accuracy[carry=True]"] == 0.5
    assert result.stderr == pytest.approx((0.75 * 0.25 / 3) ** 0.5)  # sample std (ddof=1) / sqrt(n), as lm-eval
    wrong = [s for s in result.samples if not s["correct"]]
    assert wrong == [{"prompt": "47+85=", "completion": "122", "extracted": "122", "answer": "132", "correct": False}]


def test_evaluate_pass_at_k_and_majority():
    rows = Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])

    class Fixed:
        def generate(self, prompts, params):
            table = {"a": ["1", "1", "3", "1"], "b": ["5", "2", "5", "7"]}
            return [table[p][: params.n] for p in prompts]

    from posttrain.evaluation.suite import BenchmarkSpec

    spec = BenchmarkSpec(name="t", data={}, metrics=["pass@2", "maj@4"], grader="numeric_match")
    bench = Benchmark("t", rows, "numeric_match", SamplingParams(n=4, temperature=1.0), spec=spec)
    result = evaluate(Fixed(), bench)
    assert result.accuracy == pytest.approx((3 / 4 + 1 / 4) / 2)
    # pass@2 = 1 - C(n-c, 2) / C(n, 2): prompt a 1 - 0/6 = 1, prompt b 1 - 3/6 = 0.5
    assert result.extra["pass@2"] == pytest.approx(0.75)
    assert result.extra["maj@4"] == pytest.approx(0.5)  # a: majority "1" right; b: majority "5" wrong
    assert len(result.samples[0]["completions"]) == 4


def test_logprobs_match_a_forward_pass(generator):
    import torch

    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3, logprobs=True)
    groups = generator.generate_samples(["47+85=", "1+1="], params)
    model, tok = generator.model, generator.tokenizer
    for prompt, group in zip(["47+85=", "1+1="], groups):
        for sample in group:
            assert len(sample.token_ids) == len(sample.logprobs) >= 1
            ids = tok(prompt, return_tensors="pt").input_ids
            full = torch.cat([ids, torch.tensor([sample.token_ids])], dim=1)
            with torch.no_grad():
                lps = torch.log_softmax(model(full).logits[0, ids.shape[1] - 1 : -1].float(), -1)
            expected = lps.gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)
    texts = generator.generate(["47+85=", "1+1="], params)
    assert texts == [[s.text for s in group] for group in groups]  # same seed and batch, same samples


@pytest.mark.parametrize("n_prompts, world", [(7, 3), (6, 2), (2, 4), (1, 1)])
def test_sharded_generation_splits_evenly_and_gathers_in_prompt_order(n_prompts, world):
    from types import SimpleNamespace

    from posttrain.rollout.sharded import ShardedGenerator

    class Echo:  # records what it was asked; two samples per prompt
        def __init__(self):
            self.calls = []

        def generate(self, prompts, params):
            self.calls.append(list(prompts))
            return [[f"{p}:a", f"{p}:b"] for p in prompts]

    prompts = [f"p{i}" for i in range(n_prompts)]
    echoes = [Echo() for _ in range(world)]

    def rank(r, gather):
        return ShardedGenerator(echoes[r], SimpleNamespace(num_processes=world, process_index=r), gather)

    shards = [rank(r, None).shard(prompts) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal work per rank: the same number of generate calls
    assert [p for s in shards for p in s][:n_prompts] == prompts
    per_rank = [Echo().generate(s, None) for s in shards]
    out = rank(0, lambda mine: per_rank).generate(prompts, SamplingParams())
    assert out == Echo().generate(prompts, None)  # padding dropped, order restored
    assert echoes[0].calls == [prompts if world == 1 else shards[0]]  # rank 0 generated only its shard
