"""The vLLM rollout backend against vLLM's documented API shape (a fake `vllm` module; vLLM needs CUDA), a real
vLLM-vs-transformers greedy parity check on GPU, and the backend factory."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from posttrain.errors import ModelError, RecipeError
from posttrain.rollout import SamplingParams


@dataclass
class FakeLogprob:  # vllm.sequence.Logprob
    logprob: float


@dataclass
class FakeCompletion:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, FakeLogprob]] | None = None  # one {token_id: Logprob} per step when asked for


@dataclass
class FakeRequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str
    outputs: list[FakeCompletion]


class FakeSamplingParams:  # vllm.SamplingParams: keyword fields, recorded as given
    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs


@dataclass
class FakeLoRARequest:  # vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeLLM:
    """vllm.LLM: records constructor kwargs and generate calls; completion j of prompt p is f"{p}|{j}"."""

    def __init__(self, model: str, **kwargs: Any):
        self.model = model
        self.kwargs = kwargs
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompts, sampling_params, *, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": list(prompts), "params": sampling_params.kwargs, "lora": lora_request})
        n = sampling_params.kwargs.get("n", 1)
        want = sampling_params.kwargs.get("logprobs") is not None

        def completion(p: str, j: int) -> FakeCompletion:
            ids = [10 + j, 20 + j]
            lps = [{tok: FakeLogprob(-0.5 * (k + 1)), 99: FakeLogprob(-9.0)} for k, tok in enumerate(ids)]
            return FakeCompletion(j, f"{p}|{j}", ids, lps if want else None)

        return [FakeRequestOutput(str(i), p, [completion(p, j) for j in range(n)]) for i, p in enumerate(prompts)]


@pytest.fixture
def fake_vllm(monkeypatch) -> types.ModuleType:
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    vllm.lora = lora
    lora.request = request
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    return vllm


def test_vllm_sampling_params_map_onto_vllm_fields(fake_vllm):
    from posttrain.rollout.vllm import VLLMGenerator

    gen = VLLMGenerator("some/model")
    params = SamplingParams(n=3, max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=0, seed=11, stop=("\n", "="))
    gen.generate(["a"], params)
    assert gen.llm.calls[0]["params"] == {
        "n": 3,
        "max_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,  # both ours and vLLM's "disabled" (vLLM >= 0.9 prefers 0, quietly accepts -1)
        "seed": 11,
        "stop": ["\n", "="],
        "logprobs": None,
    }
    gen.generate(["a"], SamplingParams(temperature=1.0, top_k=5))
    assert gen.llm.calls[1]["params"]["top_k"] == 5
    assert gen.llm.calls[1]["params"]["stop"] == []


def test_vllm_greedy_asks_for_one_sample_and_repeats_it(fake_vllm):
    """vLLM rejects n > 1 with temperature 0; the n greedy samples are identical, as the hf backend returns them."""
    from posttrain.rollout.vllm import VLLMGenerator

    gen = VLLMGenerator("some/model")
    out = gen.generate(["x", "y"], SamplingParams(n=3, temperature=0, max_new_tokens=4))
    sent = gen.llm.calls[0]["params"]
    assert sent["temperature"] == 0.0 and isinstance(sent["temperature"], float)
    assert sent["n"] == 1
    assert out == [["x|0"] * 3, ["y|0"] * 3]


def test_vllm_outputs_grouped_n_per_prompt_in_prompt_order(fake_vllm):
    from posttrain.rollout.vllm import VLLMGenerator

    gen = VLLMGenerator("some/model")
    prompts = ["p0", "p1", "p2", "p3"]
    out = gen.generate(prompts, SamplingParams(n=2, temperature=1.0))
    assert gen.llm.calls[0]["prompts"] == prompts
    assert out == [[f"{p}|0", f"{p}|1"] for p in prompts]


def test_vllm_engine_kwargs_passed_to_llm(fake_vllm):
    from posttrain.rollout.vllm import VLLMGenerator

    gen = VLLMGenerator(
        "some/model", tensor_parallel_size=4, gpu_memory_utilization=0.5, dtype="bfloat16", max_model_len=2048, seed=3
    )
    assert gen.llm.model == "some/model"
    assert gen.llm.kwargs == {
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.5,
        "dtype": "bfloat16",
        "max_model_len": 2048,
        "seed": 3,
        "enable_prefix_caching": True,
        "enable_lora": False,
    }
    gen.generate(["a"], SamplingParams())
    assert gen.llm.calls[0]["lora"] is None


def test_vllm_lora_adapter_enables_lora_and_rides_on_every_request(fake_vllm, tmp_path):
    from posttrain.rollout.vllm import VLLMGenerator

    gen = VLLMGenerator("some/model", lora_path=str(tmp_path / "adapter"))
    assert gen.llm.kwargs["enable_lora"] is True
    gen.generate(["a"], SamplingParams())
    gen.generate(["b"], SamplingParams())
    expected = FakeLoRARequest("adapter", 1, str(tmp_path / "adapter"))
    assert [call["lora"] for call in gen.llm.calls] == [expected, expected]


def test_a_lora_run_dir_is_served_as_its_base_plus_the_adapter(fake_vllm, tmp_path):
    import json

    from posttrain.rollout.factory import make_generator

    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 8}))
    gen = make_generator("vllm", model_path=str(final))
    assert gen.llm.model == "org/base" and gen.lora_request.lora_path == str(final)
    assert gen.llm.kwargs["enable_lora"] is True and "max_lora_rank" not in gen.llm.kwargs  # 8 <= vLLM's 16
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 24}))
    assert make_generator("vllm", model_path=str(final)).llm.kwargs["max_lora_rank"] == 32  # next allowed rank
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 1024}))
    with pytest.raises(ModelError, match="rank 1024"):
        make_generator("vllm", model_path=str(final))
    (final / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(ModelError, match="names no base_model_name_or_path"):
        make_generator("vllm", model_path=str(final))


def test_vllm_missing_raises_model_error_pointing_at_extra_and_hf_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    from posttrain.rollout.vllm import VLLMGenerator

    with pytest.raises(ModelError) as info:
        VLLMGenerator("some/model")
    message = str(info.value)
    assert 'pip install -e ".[vllm]"' in message
    assert "CUDA" in message and "hf backend" in message and "0.22-0.31" in message


def test_make_generator_vllm_forwards_engine_kwargs(fake_vllm):
    from posttrain.rollout.factory import make_generator
    from posttrain.rollout.vllm import VLLMGenerator

    gen = make_generator("vllm", model_path="some/model", tensor_parallel_size=2)
    assert isinstance(gen, VLLMGenerator)
    assert gen.llm.model == "some/model" and gen.llm.kwargs["tensor_parallel_size"] == 2


def test_make_generator_hf_loads_model_and_tokenizer_from_path(tiny_model_dir):
    from posttrain.rollout.factory import make_generator
    from posttrain.rollout.hf import HFGenerator

    gen = make_generator("hf", model_path=str(tiny_model_dir), batch_size=8)
    assert isinstance(gen, HFGenerator) and gen.batch_size == 8
    assert gen.tokenizer.pad_token is not None
    out = gen.generate(["12+34=", "5+6="], SamplingParams(n=2, temperature=0, max_new_tokens=3))
    assert len(out) == 2 and all(len(samples) == 2 for samples in out)


def test_make_generator_hf_reuses_given_model_and_tokenizer(tiny_model_dir):
    from posttrain.models.tiny import TinySpec, build_tiny_model
    from posttrain.rollout.factory import make_generator

    model, tokenizer = build_tiny_model(TinySpec(hidden_size=32, intermediate_size=64))
    gen = make_generator("hf", model_path="not/used", model=model, tokenizer=tokenizer)
    assert gen.model is model and gen.tokenizer is tokenizer


def test_make_generator_unknown_backend_names_valid_ones():
    from posttrain.rollout.factory import make_generator

    with pytest.raises(RecipeError, match=r"unknown rollout backend 'sglang' \(valid: hf, vllm\)"):
        make_generator("sglang", model_path="some/model")


@pytest.mark.gpu
def test_vllm_greedy_matches_hf_greedy_on_tiny_model(tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from posttrain.models.loading import load_tokenizer
    from posttrain.models.tiny import TinySpec, save_tiny_model
    from posttrain.rollout.hf import HFGenerator
    from posttrain.rollout.vllm import VLLMGenerator

    model_dir = str(save_tiny_model(tmp_path / "m", TinySpec(task="text", hidden_size=64, intermediate_size=128)))
    prompts = ["Hello, ", "abc", "The answer is", "x = 1; y ="]
    params = SamplingParams(temperature=0, max_new_tokens=8)
    hf = HFGenerator(AutoModelForCausalLM.from_pretrained(model_dir).cuda(), load_tokenizer(model_dir))
    expected = hf.generate(prompts, params)
    # fp32 both sides so argmax ties don't flip between kernels; a small engine is plenty for a 64-dim model
    vllm_gen = VLLMGenerator(model_dir, dtype="float32", gpu_memory_utilization=0.3, max_model_len=128)
    assert vllm_gen.generate(prompts, params) == expected


def test_vllm_logprobs_of_the_sampled_tokens(fake_vllm):
    from posttrain.rollout.vllm import VLLMGenerator

    gen = VLLMGenerator("some/model")
    (group,) = gen.generate_samples(["a"], SamplingParams(n=2, temperature=1.0, logprobs=True))
    assert gen.llm.calls[0]["params"]["logprobs"] == 0  # sampled token only, no alternatives
    assert [s.token_ids for s in group] == [[10, 20], [11, 21]]
    assert group[0].logprobs == [-0.5, -1.0]  # the sampled token's entry, not the alternative 99
    assert gen.generate(["a"], SamplingParams(n=2, temperature=1.0)) == [["a|0", "a|1"]]


# ---------------------------------------------- held-out eval through the trainer's own vLLM engine (TRL 1.16)


class FakeEngine:
    """trl.generation.vllm_generation.VLLMGeneration's surface the eval uses: mode, llm / vllm_client,
    tensor_parallel_size, sync_weights()."""

    def __init__(self, mode: str, llm: Any = None, client: Any = None, tp: int = 1):
        self.mode, self.llm, self.vllm_client, self.tensor_parallel_size = mode, llm, client, tp
        self.syncs = 0

    def sync_weights(self):
        self.syncs += 1


class FakeTrainer:
    def __init__(self, engine: FakeEngine, step: int = 0):
        self.use_vllm, self.vllm_generation = True, engine
        self.state = types.SimpleNamespace(global_step=step)
        self._last_loaded_step = 0


class FakeClient:
    """trl.generation.vllm_client.VLLMClient.generate: completion token ids, n per prompt, prompt-major."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, logprobs=0,
                 generation_kwargs=None, **kwargs):  # fmt: skip
        self.calls.append({"prompts": list(prompts), "n": n, "temperature": temperature, "max_tokens": max_tokens,
                           "kwargs": generation_kwargs})  # fmt: skip
        ids = [self.tokenizer.encode(f"{p}{j}", add_special_tokens=False) for p in prompts for j in range(n)]
        return {"prompt_ids": [[] for _ in prompts], "completion_ids": ids, "logprobs": None}


def test_in_training_eval_generates_with_the_colocated_engine_synced_to_the_current_step(fake_vllm):
    from posttrain.rollout.trainer_vllm import TrainerVLLMGenerator, held_out_generator

    llm = FakeLLM("policy")
    trainer = FakeTrainer(FakeEngine("colocate", llm=llm), step=20)
    generator = held_out_generator(None, None, 8, trainer)
    assert isinstance(generator, TrainerVLLMGenerator)
    params = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)
    assert generator.generate(["1+2=", "3+4="], params) == [["1+2=|0"], ["3+4=|0"]]
    assert trainer.vllm_generation.syncs == 1 and trainer._last_loaded_step == 20  # weights of step 20 pushed first
    generator.generate(["5+6="], params)
    assert trainer.vllm_generation.syncs == 1  # same step: TRL's rule, no second sync
    assert llm.calls[0]["params"]["temperature"] == 0.0 and llm.calls[0]["params"]["max_tokens"] == 12


def test_in_training_eval_sends_prompts_to_the_vllm_server_from_the_main_process(tiny_model_dir):
    from transformers import AutoTokenizer

    from posttrain.rollout.trainer_vllm import held_out_generator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = FakeClient(tokenizer)
    trainer = FakeTrainer(FakeEngine("server", client=client), step=0)
    generator = held_out_generator(None, tokenizer, 8, trainer)
    out = generator.generate(["12", "34"], SamplingParams(n=2, max_new_tokens=5, temperature=0.0, stop=("\n",)))
    assert out == [["120", "120"], ["340", "340"]]  # greedy: one asked for, repeated n times as the hf backend does
    assert client.calls == [{"prompts": ["12", "34"], "n": 1, "temperature": 0.0, "max_tokens": 5,
                             "kwargs": {"seed": 0, "stop": ["\n"]}}]  # fmt: skip
    assert trainer.vllm_generation.syncs == 0  # step 0: the engine already holds the initial weights


def test_without_vllm_the_eval_generates_with_transformers(tiny_model_dir):
    from posttrain.rollout.hf import HFGenerator
    from posttrain.rollout.sharded import ShardedGenerator
    from posttrain.rollout.trainer_vllm import held_out_generator

    hf_trainer = types.SimpleNamespace(use_vllm=False)
    generator = held_out_generator(object(), None, 8, hf_trainer)
    assert isinstance(generator, ShardedGenerator) and isinstance(generator.generator, HFGenerator)


def test_tensor_parallel_ranks_share_one_shard(monkeypatch):
    import accelerate.utils

    from posttrain.rollout.trainer_vllm import _TPGroups

    state = types.SimpleNamespace(num_processes=4, process_index=3)
    groups = _TPGroups(state, tp=2)
    assert (groups.num_processes, groups.process_index) == (2, 1)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda items: ["g0", "g0", "g1", "g1"])
    assert groups.gather(["g1"]) == ["g0", "g1"]  # one copy per tensor-parallel group


def test_trl_internals_the_vllm_eval_relies_on():
    import inspect

    from trl import GRPOTrainer
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    src = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert "self.state.global_step != self._last_loaded_step" in src and "self.vllm_generation.sync_weights()" in src
    init = inspect.getsource(VLLMGeneration.__init__)
    for attr in ("self.mode", "self.llm", "self.vllm_client", "self.tensor_parallel_size"):
        assert attr in init or attr in inspect.getsource(VLLMGeneration), attr
    params = inspect.signature(VLLMClient.generate).parameters
    assert {"prompts", "n", "temperature", "top_p", "top_k", "max_tokens", "logprobs", "generation_kwargs"} <= set(
        params
    )
    assert '"completion_ids"' in inspect.getsource(VLLMClient.generate)
