"""Classic reward model: a sequence classifier with one output, read at the last non-pad token; and the
`sequence_classifier` reward that wraps it for GRPO/NFT."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

from reward_models.errors import ModelError, RewardError
from reward_models.registry import register
from reward_models.scoring import messages_text, whole_model_loading


class SequenceClassifierScorer:
    """Score full texts with an `AutoModelForSequenceClassification` reward model (num_labels = 1), batched.

    `scorer(texts)` scores finished texts; `scorer.score(prompts, completions)` (the `Scorer` protocol) scores
    prompt + completion. A classic RM judges a completion on its own, so `score` refuses references rather than
    ignoring them: a job that sends references expects them to count.
    """

    def __init__(self, model_path: str, *, batch_size: int = 16, max_length: int = 2048, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            with whole_model_loading():  # not partitioned by a ZeRO-3 run that loads it as a reward
                self.model, info = AutoModelForSequenceClassification.from_pretrained(
                    model_path, num_labels=1, output_loading_info=True
                )
        except OSError as err:
            raise ModelError(f"could not load reward model '{model_path}': {err}") from err
        missing_head = [k for k in info.get("missing_keys", []) if k.split(".")[0] in ("score", "classifier")]
        if missing_head:
            # A plain LM dir loads "fine" with a random head: every score would be noise. Say so loudly.
            warnings.warn(
                f"reward model '{model_path}' has no trained scalar head ({', '.join(missing_head)} newly "
                "initialised): its scores are random. Point it at a trained reward model dir.",
                stacklevel=2,
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The classifier head reads the last non-pad token, which it finds through config.pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> SequenceClassifierScorer:
        """Same as the constructor; mirrors `PolarScorer.from_pretrained` for the reward server's CLI."""
        return cls(path, **kwargs)

    def __call__(self, texts: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            enc: Any = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                      max_length=self.max_length, padding_side="right")  # fmt: skip
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                logits = self.model(**enc).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], references: Sequence[Any] | None = None
    ) -> list[float]:
        """Scores of prompt + completion. Items are strings or message lists (TRL's conversational form)."""
        if references is not None:
            raise RewardError(
                "a sequence-classifier reward model scores prompt + completion alone and cannot use references; "
                "send none (unset reference_column)"
            )
        if len(prompts) != len(completions):
            raise RewardError(f"sequence classifier: {len(prompts)} prompts for {len(completions)} completions")
        return self([self.text(p, c) for p, c in zip(prompts, completions)])

    def count_tokens(self, prompts: Sequence[Any], completions: Sequence[Any], references: Any = None) -> int:
        """Tokens of the texts `score` would read, before truncation (the reward server's per-request budget)."""
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        return sum(len(ids) for ids in self.tokenizer(texts)["input_ids"]) if texts else 0

    def text(self, prompt: Any, completion: Any) -> str:
        """The text the RM reads: a conversation through the RM's own chat template when it has one (RMs are
        trained on templated chats), otherwise prompt and completion concatenated."""
        if isinstance(prompt, list) and isinstance(completion, list) and self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return messages_text(prompt) + messages_text(completion)


@functools.lru_cache(maxsize=4)
def cached_scorer(model: str, batch_size: int, max_length: int) -> SequenceClassifierScorer:
    """One loaded RM per (path, settings) for the whole process: rewards are called every step."""
    return SequenceClassifierScorer(model, batch_size=batch_size, max_length=max_length)


@register("sequence_classifier", model_option="model")
def sequence_classifier_reward(
    prompts: list[Any],
    completions: list[Any],
    *,
    model: str,
    batch_size: int = 16,
    max_length: int = 2048,
    **columns: Any,
) -> list[float]:
    """Classic RM reward for GRPO/NFT: the sequence classifier's scalar for prompt + completion, batched.
    `model` is a local dir loadable with `AutoModelForSequenceClassification` (num_labels = 1)."""
    return cached_scorer(str(model), int(batch_size), int(max_length)).score(prompts, completions)
