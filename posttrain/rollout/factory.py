"""Pick a rollout backend by name: `hf` (transformers, CPU or GPU) or `vllm` (offline vLLM, GPU)."""

from __future__ import annotations

from typing import Any

from posttrain.errors import ModelError, RecipeError
from posttrain.recipe import BACKENDS
from posttrain.rollout import Generator


def make_generator(
    backend: str,
    *,
    model_path: str,
    model: Any = None,
    tokenizer: Any = None,
    batch_size: int = 64,
    **vllm_kwargs: Any,
) -> Generator:
    """A `Generator` for `backend`. `hf` reuses `model`/`tokenizer` when given (e.g. the policy being trained)
    and loads them from `model_path` otherwise; `vllm` builds its own engine from `model_path` with
    `vllm_kwargs` (see `VLLMGenerator`)."""
    if backend == "hf":
        from posttrain.models.loading import load_policy, load_tokenizer
        from posttrain.recipe import ModelSection
        from posttrain.rollout.hf import HFGenerator

        if tokenizer is None:
            tokenizer = load_tokenizer(model_path)
        if tokenizer.pad_token is None:
            # batched generation left-pads; many causal-LM tokenizers ship without a pad token
            tokenizer.pad_token = tokenizer.eos_token
        if model is None:
            from posttrain.models.loading import resolve_precision

            precision = resolve_precision("auto")  # bf16 on a bf16 GPU, fp32 on CPU
            model = load_policy(model_path, ModelSection(path=model_path), precision)
            if precision != "fp32":
                model.to("cuda")
        return HFGenerator(model, tokenizer, batch_size=batch_size)
    if backend == "vllm":
        from posttrain.rollout.vllm import VLLMGenerator, adapter_config

        adapter = adapter_config(model_path) if "lora_path" not in vllm_kwargs else None
        if adapter is not None:
            # A LoRA run's final/ holds only the adapter: vLLM loads its base and applies it on every request.
            base = adapter.get("base_model_name_or_path")
            if not base:
                raise ModelError(f"{model_path}/adapter_config.json names no base_model_name_or_path")
            vllm_kwargs = {**vllm_kwargs, "lora_path": model_path}
            model_path = base
        return VLLMGenerator(model_path, **vllm_kwargs)
    raise RecipeError(f"unknown rollout backend '{backend}' (valid: {', '.join(BACKENDS)})")
