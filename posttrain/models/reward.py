"""Reward models: a sequence classifier with one bias-free scalar head over a causal LM checkpoint (POLAR and the
classic Bradley-Terry RM), optionally with POLAR's special tokens added."""

from __future__ import annotations

from posttrain.errors import ModelError
from posttrain.models.loading import load_kwargs, load_tokenizer, quiet_library_progress
from posttrain.recipe import ModelSection


def load_reward_model(
    source: str, section: ModelSection, precision: str = "fp32", polar_tokens: bool = True, zero_new_head: bool = False
):
    """(model, tokenizer): `source` loaded as a one-label sequence classifier with the section's dtype/attention;
    POLAR's split/reward tokens are added (embeddings at the mean) when `polar_tokens`. With `zero_new_head`, a
    value head the checkpoint does not hold (a causal LM's) starts at zero, as POLAR's official trainer starts it
    (xtuner `RewardModel`: `v_head.weight.data.zero_()`); a trained head is kept."""
    from transformers import AutoModelForSequenceClassification

    from reward_models.polar import add_polar_tokens

    quiet_library_progress()
    tokenizer = load_tokenizer(source, trust_remote_code=section.trust_remote_code)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, output_loading_info=True, **load_kwargs(section, precision)
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load '{source}' as a reward model (sequence classifier): {err}") from err
    if zero_new_head:
        zero_missing_head(model, info.get("missing_keys", ()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if polar_tokens:
        add_polar_tokens(model, tokenizer)
    return model, tokenizer


def zero_missing_head(model, missing_keys) -> bool:
    """Zero the scalar head (`score`, the sequence classifiers of the Llama/Qwen2/InternLM2 families) when the
    checkpoint did not hold it, i.e. it was initialised fresh; True when it did."""
    import torch

    head = getattr(model, "score", None)
    if head is None or not any(key.split(".")[-2:-1] == ["score"] for key in missing_keys):
        return False
    from contextlib import nullcontext

    from transformers.integrations import is_deepspeed_zero3_enabled

    gathered = nullcontext()
    if is_deepspeed_zero3_enabled():  # the head is partitioned already: gather it, rank 0 writes, all re-partition
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0)
    with gathered, torch.no_grad():
        for parameter in head.parameters():
            parameter.zero_()
    return True
