"""The scorer protocol: what the reward server serves and what model-backed rewards (POLAR, classic RMs) wrap."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Scorer(Protocol):
    """Scores (prompt, completion[, reference]) triples in one batch call, one float per completion.

    Items are strings; implementations may also accept TRL's conversational form (a list of
    `{"role", "content"}` messages), which the reward server passes through unchanged. A scorer that needs
    references (POLAR) raises when they are missing; one that cannot use them says what it does with them.
    """

    def score(self, prompts: list[str], completions: list[str], references: list[str] | None = None) -> list[float]:
        """One score per completion, in input order."""
        ...


def is_messages(value: Any) -> bool:
    """A chat message list: [{role, content}, ...] (a string is not one)."""
    return (
        not isinstance(value, str)
        and isinstance(value, Sequence)
        and all(isinstance(m, Mapping) and "content" in m for m in value)
    )


def messages_text(value: Any) -> str:
    """A prompt or completion as plain text: a string as is, a message list as its contents joined by newlines."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        return "\n".join(str(m["content"]) for m in value)
    return str(value)


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Load a frozen scoring model whole, also inside a DeepSpeed ZeRO-3 run.

    Under ZeRO-3 (accelerate's `zero3_init_flag`), transformers' `from_pretrained` partitions every model it builds
    across the ranks: a reward model a reward function loads for itself then has empty weights outside a DeepSpeed
    engine (its first call fails with "Padding_idx must be within num_embeddings"). A scorer is used for inference
    only, by every rank on its own samples, so it is loaded whole (the memory plan counts it so). transformers has
    no public switch for this: its registered DeepSpeed config is unset for the load and restored after.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration: nothing partitions
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
