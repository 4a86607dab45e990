"""Tiny local causal LMs and tokenizers: the CPU quickstart's policy and the tests' models, built without a hub.

The tokenizer is character-level (one token per character) and saved as a plain `tokenizers` backend with a
Llama config. That pairing matters: transformers 5.x rebuilds the tokenizer pipeline of some model families
(e.g. `qwen2`) on reload, silently changing ids; a Llama config with the generic backend loads the saved
`tokenizer.json` as-is, and `tests/test_tiny.py` checks the ids survive a save/reload.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ModelError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# Characters each task needs; `text` covers printable ASCII for tests of other trainers.
TASK_CHARSETS = {
    "arithmetic": "0123456789+-*= ",
    "markov": "abcdefgh\n",  # posttrain.data.markov (POLAR synthetic world)
    "text": string.digits + string.ascii_letters + string.punctuation + " \n",
}


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Llama-style model (~0.3M parameters at the defaults)."""

    task: str = "arithmetic"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 128
    seed: int = 0


def build_tokenizer(task: str = "arithmetic"):
    """A character-level fast tokenizer for `task` (pad/bos/eos/unk first, then one id per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if task not in TASK_CHARSETS:
        raise ModelError(f"unknown tiny-model task '{task}' (known: {', '.join(TASK_CHARSETS)})")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *TASK_CHARSETS[task]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_model(spec: TinySpec = TinySpec()):
    """Return (model, tokenizer) freshly initialised with `spec.seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec.task)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_tiny_model(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Build a tiny model and save it as a normal Hugging Face model dir loadable with from_pretrained."""
    out = Path(out_dir)
    model, tokenizer = build_tiny_model(spec)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
