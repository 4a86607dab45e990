"""The transformers pieces of `trainer: polar` (imported only when a POLAR run starts): triplet encoding, the
collator that scores chosen and rejected in one forward, and Trainer with the POLAR pairwise loss."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer

from reward_models.polar import bt_loss, pad_batch, sequence_scores


def encode_rows(rows, encoder, origin: str):
    """Pre-tokenise each triplet into chosen/rejected id lists (datasets.map: cached, parallel on big sets)."""

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        # One prompt truncation for both sequences of the pair (as xtuner trains the released RMs).
        chosen, rejected = encoder.encode_pair(row["prompt"], row["reference"], row["chosen"], row["rejected"])
        return {"chosen_ids": chosen, "rejected_ids": rejected}

    return rows.map(encode, remove_columns=rows.column_names, desc=f"tokenising {origin}")


class TripletCollator:
    """Right-pads [chosen..., rejected...] of a batch into one (2B, T) tensor, so one forward scores both."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        input_ids, attention_mask = pad_batch(seqs, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class PolarTrainer(Trainer):
    """transformers' Trainer with the POLAR pairwise loss and its accuracy/score/margin metrics."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-micro-batch mean, so let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._polar_metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
        chosen, rejected = scores.chunk(2)
        loss = bt_loss(chosen, rejected)
        with torch.no_grad():
            stats = torch.stack(
                [(chosen > rejected).float().mean(), chosen.mean(), rejected.mean(), (chosen - rejected).mean()]
            )
            stats = self.accelerator.gather_for_metrics(stats.unsqueeze(0)).mean(0).tolist()
        for name, value in zip(("accuracy", "chosen_score", "rejected_score", "margin"), stats):
            self._polar_metrics[name].append(value)
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._polar_metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._polar_metrics.items()})
            self._polar_metrics.clear()
        super().log(logs, start_time)
