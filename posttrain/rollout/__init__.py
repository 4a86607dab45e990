"""Rollout generation: one `Generator` protocol, a transformers backend (CPU/GPU) and a vLLM backend (GPU).

The eval suite, RFT sampling and POLAR data building all sample through this layer; GRPO-style trainers use
TRL's own generation (which drives vLLM itself) and share only the sampling settings from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every backend. temperature 0 means greedy decoding."""

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # also return each generated token's log-probability under the model (unwarped)


@dataclass
class Sample:
    """One completion: its text and, when asked for, the generated token ids and their log-probabilities
    (covering every generated token, a matched stop string included; padding after EOS excluded)."""

    text: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


class Generator(Protocol):
    """Turns rendered prompt strings into `n` completions each: result[i][j] is sample j of prompt i."""

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]: ...

    def generate_samples(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]: ...


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut `text` at the first stop string (the stop string itself is removed, as vLLM does)."""
    cut = len(text)
    for s in stop:
        idx = text.find(s)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]
