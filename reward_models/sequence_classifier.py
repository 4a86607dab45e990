"""Classic reward model: a sequence classifier with one output, read at the last non-pad token."""

from __future__ import annotations

from typing import Any

from posttrain.errors import ModelError


class SequenceClassifierScorer:
    """Score full texts with an `AutoModelForSequenceClassification` reward model (num_labels = 1), batched."""

    def __init__(self, model_path: str, *, batch_size: int = 16, max_length: int = 2048, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
        except OSError as err:
            raise ModelError(f"could not load reward model '{model_path}': {err}") from err
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The classifier head reads the last non-pad token, which it finds through config.pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

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
