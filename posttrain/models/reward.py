"""Reward models: a sequence classifier with one bias-free scalar head over a causal LM checkpoint (POLAR and the
classic Bradley-Terry RM), optionally with POLAR's special tokens added."""

from __future__ import annotations

from posttrain.errors import ModelError
from posttrain.models.loading import load_kwargs, load_tokenizer, quiet_library_progress
from posttrain.recipe import ModelSection


def load_reward_model(source: str, section: ModelSection, precision: str = "fp32", polar_tokens: bool = True):
    """(model, tokenizer): `source` loaded as a one-label sequence classifier with the section's dtype/attention;
    POLAR's split/reward tokens are added (embeddings at the mean) when `polar_tokens`."""
    from transformers import AutoModelForSequenceClassification

    from reward_models.polar import add_polar_tokens

    quiet_library_progress()
    tokenizer = load_tokenizer(source, trust_remote_code=section.trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, **load_kwargs(section, precision)
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load '{source}' as a reward model (sequence classifier): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if polar_tokens:
        add_polar_tokens(model, tokenizer)
    return model, tokenizer
