"""vLLM backend: the `Generator` protocol over offline `vllm.LLM` (GPU only).

API shape followed (vLLM 0.22-0.31, the window TRL 1.16 supports):
- `LLM(model, *, tensor_parallel_size, dtype, seed, gpu_memory_utilization, **EngineArgs)`:
  https://docs.vllm.ai/en/v0.22.1/api/vllm/entrypoints/llm/
- `LLM.generate(prompts, sampling_params, *, lora_request=...) -> list[RequestOutput]`, sorted back into input
  order by request id; `RequestOutput.outputs[j].text` is sample j.
- `SamplingParams` fields and conventions: vllm/sampling_params.py ("top_k: Set to 0 (or -1) to consider all
  tokens"; "The returned output will not contain the stop strings").
- `LoRARequest(lora_name, lora_int_id, lora_path)` with `enable_lora=True`:
  https://docs.vllm.ai/en/latest/examples/features/lora/
- `LoRAConfig.max_lora_rank: MaxLoRARanks = 16`, `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`:
  https://docs.vllm.ai/en/v0.22.1/api/vllm/config/lora/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError
from posttrain.rollout import Sample, SamplingParams

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks; its default max_lora_rank is 16


def adapter_config(path: str | Path) -> dict[str, Any] | None:
    """A peft adapter dir's adapter_config.json (None when `path` is not an adapter dir)."""
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}: not valid JSON ({err.msg})") from err


def lora_engine_kwargs(lora_path: str) -> dict[str, Any]:
    """`enable_lora`, and `max_lora_rank` raised to the adapter's rank where it exceeds vLLM's default of 16."""
    kwargs: dict[str, Any] = {"enable_lora": True}
    rank = int((adapter_config(lora_path) or {}).get("r", 0))
    if rank > 16:
        fits = [r for r in _LORA_RANKS if r >= rank]
        if not fits:
            raise ModelError(f"LoRA adapter {lora_path} has rank {rank}; vLLM serves ranks up to {_LORA_RANKS[-1]}")
        kwargs["max_lora_rank"] = fits[0]
    return kwargs


_MISSING_VLLM = (
    'the vllm rollout backend needs the `vllm` package: pip install -e ".[vllm]" '
    "(vLLM needs a CUDA GPU; TRL 1.16 supports vLLM 0.22-0.31). On CPU use the hf backend instead."
)


class VLLMGenerator:
    """Generate with an offline `vllm.LLM` built from a model dir or hub id (optionally with one LoRA adapter)."""

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        max_model_len: int | None = None,
        lora_path: str | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
    ):
        try:
            import vllm
        except ImportError as err:
            raise ModelError(_MISSING_VLLM) from err
        self._vllm = vllm
        self.lora_request: Any = None
        if lora_path is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, lora_path)
        self.llm = vllm.LLM(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=enable_prefix_caching,
            **(lora_engine_kwargs(lora_path) if lora_path is not None else {"enable_lora": False}),
        )

    @classmethod
    def from_engine(cls, llm: Any, lora_request: Any = None) -> VLLMGenerator:
        """A generator over an engine someone else built and keeps current (TRL's colocated `vllm.LLM`, whose
        weights the trainer syncs): no engine of its own."""
        import vllm

        self = cls.__new__(cls)
        self._vllm, self.llm, self.lora_request = vllm, llm, lora_request
        return self

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        return [[s.text for s in group] for group in self.generate_samples(prompts, params)]

    def generate_samples(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        greedy = params.temperature == 0
        # vLLM rejects n > 1 with greedy decoding ("n must be 1 when using greedy sampling"); the n greedy samples
        # are identical anyway, so ask for one and repeat it, as the hf backend returns.
        n = 1 if greedy else params.n
        sampling = self._vllm.SamplingParams(
            n=n,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if greedy else params.temperature,
            top_p=params.top_p,
            # Our 0 already means "disabled", which is vLLM's default and documented preference in this window
            # ("Set to 0 (or -1)"); only much older vLLM (<= 0.8, default -1) rejected 0.
            top_k=params.top_k,
            # vLLM derives child seeds seed+j for the n samples of a request, so samples still differ.
            seed=params.seed,
            # vLLM drops the stop string from the text by default (include_stop_str_in_output=False), as
            # `truncate_at_stop` does for the hf backend.
            stop=list(params.stop),
            # logprobs=0: no alternatives, just the sampled token's own log-probability per step.
            logprobs=0 if params.logprobs else None,
        )
        outputs = self.llm.generate(prompts, sampling, lora_request=self.lora_request)
        groups = [[_to_sample(c, params.logprobs) for c in request.outputs] for request in outputs]
        return [samples * params.n if greedy else samples for samples in groups]


def _to_sample(completion: Any, with_logprobs: bool) -> Sample:
    """vLLM CompletionOutput → Sample; `completion.logprobs` is one {token_id: Logprob} dict per generated token."""
    if not with_logprobs or completion.logprobs is None:
        return Sample(completion.text)
    ids = list(completion.token_ids)
    return Sample(completion.text, ids, [step[tok].logprob for tok, step in zip(ids, completion.logprobs)])
