"""Load a causal LM and its tokenizer as a recipe's `model:` section says (dtype, attention, LoRA config, tiny
models). Functions take the model options (`ModelSection`), never a whole recipe."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError
from posttrain.recipe import ModelSection

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_precision(setting: str = "auto") -> str:
    """fp32 | bf16 | fp16. `auto` picks bf16 on a GPU that supports it and fp32 on CPU.

    TRL defaults to bf16 autocast everywhere; on CPU that makes tiny-model steps ~8x slower (docs/performance.md).
    """
    if setting != "auto":
        return setting
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def materialise_tiny(tiny: dict[str, Any], into: Path) -> Path:
    """Build a `model.tiny` spec (keyword args of `TinySpec`) as a model dir `into/base_model` (once; a resumed run
    reuses it) and return its path."""
    from posttrain.models.tiny import TinySpec, save_tiny_model

    try:
        spec = TinySpec(**tiny)
    except TypeError as err:
        raise ModelError(f"bad model.tiny spec: {err}") from err
    target = into / "base_model"
    build_once(target, lambda tmp: save_tiny_model(tmp, spec))
    return target


def build_once(target: Path, build: Callable[[Path], Any]) -> None:
    """Write a model dir once per run, safely under a multi-process launch: the main process builds it into
    `<target>.tmp` and renames it into place (so a half-written dir is never taken for a model), the others
    wait at accelerate's barrier and then find it there. A resumed run reuses it."""
    from posttrain.models.processes import process_state

    with process_state().main_process_first():
        if (target / "config.json").exists() or (target / "model_index.json").exists():
            return
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        tmp.rename(target)


def quiet_library_progress() -> None:
    """Silence datasets'/transformers' per-map and per-save bars: a run's own progress bar is the one it shows."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    # TRL 1.16 calls transformers 5's deprecated `is_gradient_checkpointing` on every save; nothing for users to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(load_error(path, "tokenizer", err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_kwargs(section: ModelSection, precision: str = "fp32") -> dict[str, Any]:
    """`from_pretrained` keywords for the model section: dtype (`auto` follows the training precision), remote
    code and attention implementation."""
    import torch

    if section.dtype == "auto":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    else:
        dtype = getattr(torch, _DTYPES[section.dtype])
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": section.trust_remote_code}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    return kwargs


def load_policy(path: str, section: ModelSection, precision: str = "fp32"):
    """A causal LM from `path` with the section's dtype and attention implementation (LoRA is applied by TRL)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **load_kwargs(section, precision))
    except OSError as err:
        raise ModelError(load_error(path, "model", err)) from err


def peft_config(section: ModelSection):
    """A peft LoraConfig for TRL trainers' `peft_config=`, or None to train all weights."""
    if section.lora is None:
        return None
    from peft import LoraConfig

    lora = section.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def load_error(path: str, what: str, err: Exception) -> str:
    if Path(path).exists():
        return f"could not load the {what} from '{path}': {err}"
    if path.startswith((".", "/", "~")) or Path(path).suffix:
        return f"{what} path '{path}' does not exist"
    return (
        f"could not load the {what} '{path}' (not a local dir; hub download failed or is disabled: {err}). "
        "Pass a local model dir, or unset HF_HUB_OFFLINE where the hub is reachable."
    )
