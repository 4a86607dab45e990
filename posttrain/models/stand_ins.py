"""Tiny stand-ins of real models, for `posttrain train --rehearse`: the architecture family of a model dir or hub id,
and a tiny reward model of a reward's kind (`posttrain.models.tiny.save_family_model` builds the policies)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def model_family(source: str) -> tuple[str, str]:
    """(model_type, how it was found) of a model dir or hub id; llama when neither tells."""
    from posttrain.models.memory import KNOWN_SHAPES

    config = Path(source) / "config.json"
    if config.is_file():
        try:
            return str(json.loads(config.read_text()).get("model_type") or "llama"), f"from {config}"
        except (OSError, ValueError):
            pass
    if source in KNOWN_SHAPES:
        return KNOWN_SHAPES[source].family, "of the known hub model"
    return "llama", "unknown here (no config.json): llama"


def stand_in_reward_model(target: Path, source: str, prepare: Callable[[Any, Any], Any] | None = None) -> str:
    """A tiny random scalar-head reward model of the family of `source`, prepared by the reward's own `prepare(model,
    tokenizer)` when it declares one (`reward_models.RewardInfo.stand_in`, e.g. POLAR's special tokens); returns the
    family built."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.models.tiny import save_family_model

    family, _ = model_family(source)
    path, built = save_family_model(target, family, head="classifier")
    if prepare is not None:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        prepare(model, tokenizer)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return built
