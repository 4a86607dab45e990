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
    # ChatML on top of the task's characters: <|im_start|>/<|im_end|> appended to the vocabulary (the ids of every
    # other token unchanged), the chat template above, and <|im_end|> as the end of a turn (eos).
    chat: bool = False
    # Tool calling on top of `chat` (implies it): <tool_call>/</tool_call> appended after ChatML's tokens, a template
    # that renders tool calls and tool results (TOOL_TEMPLATE), and the response template TRL parses calls with.
    tools: bool = False


def build_tokenizer(task: str = "arithmetic", chat: bool = False, tools: bool = False):
    """A character-level fast tokenizer for `task` (pad/bos/eos/unk first, then one id per character); with `chat`,
    ChatML's two tokens last and its template (`TinySpec.chat`); with `tools`, also the tool-call tokens, the
    tool-calling template and its response template (`TinySpec.tools`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if task not in TASK_CHARSETS:
        raise ModelError(f"unknown tiny-model task '{task}' (known: {', '.join(TASK_CHARSETS)})")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *TASK_CHARSETS[task]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat or tools:
        tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
        tokenizer.eos_token = CHAT_TOKENS[1]
        tokenizer.chat_template = CHATML_TEMPLATE
    if tools:
        # Plain added tokens, not special ones: decoding keeps them, so TRL's response parser sees the calls.
        tokenizer.add_tokens(list(TOOL_TOKENS))
        tokenizer.chat_template = TOOL_TEMPLATE
        tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    return tokenizer


def build_tiny_model(spec: TinySpec = TinySpec()):
    """Return (model, tokenizer) freshly initialised with `spec.seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec.task, spec.chat, spec.tools)
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


# ChatML, the template of the Qwen family (and many others): what a tiny stand-in needs for `data.chat_template`.
# The assistant turns sit inside `{% generation %}` markers (they change no rendered text): TRL's assistant-only
# SFT loss reads them; the turn's <|im_end|> is inside, so the model learns to stop.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% elif m['role'] in ['system', 'user'] %}{{ m['content'] }}<|im_end|>"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# ChatML with tools, kept short for a character-level model (Qwen's tool preamble is ~600 characters): a system line
# naming the tools, each call as `<tool_call>{"name":...,"arguments":{...}}</tool_call>` inside the assistant turn (the
# JSON Qwen writes, without spaces), tool results as `tool` turns (outside the generation markers: no SFT loss).
# Prefix-preserving, as TRL's multi-turn loop requires.
TOOL_TOKENS = ("<tool_call>", "</tool_call>")
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} "
    "{{ (t['function'] if t['function'] is defined else t)['name'] }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}{% set f = c['function'] if c['function'] is defined else c %}"
    "<tool_call>{\"name\":{{ f['name'] | tojson }},\"arguments\":"
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson(separators=(',', ':')) }}"
    "{% endif %}}</tool_call>{% endfor %}<|im_end|>{% endgeneration %}"
    "{% elif m['role'] in ['system', 'user', 'tool'] %}{{ m['content'] }}<|im_end|>"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# How transformers' `parse_response` reads an assistant turn of TOOL_TEMPLATE back (the format of TRL's Qwen3 one).
TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


def build_byte_tokenizer(tools: bool = False):
    """A byte-level BPE tokenizer with no merges (one id per byte, 256 + 3 special tokens) and a ChatML chat
    template: any text encodes, and it reloads with the same ids whatever class transformers picks for the model
    family (a `qwen2` config reloads it as `Qwen2Tokenizer`, which rebuilt the character tokenizer above wrongly).
    `tools`: the tool-calling template and its response template instead (calls spelled in bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tokenizer.chat_template = TOOL_TEMPLATE if tools else CHATML_TEMPLATE
    if tools:
        tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    return tokenizer


def save_family_model(
    out_dir: str | Path, family: str, *, tied: bool = True, head: str = "causal", seed: int = 0, tools: bool = False
) -> tuple[Path, str]:
    """A tiny random model of architecture `family` (a transformers `model_type`: qwen2, llama, mistral, ...) with
    the byte tokenizer, saved loadable with from_pretrained: 2 layers, hidden 64, grouped-query attention.
    `head`: causal (a policy) or classifier (a scalar-head reward model); `tools`: the tool-calling template. A family
    transformers does not know natively (e.g. internlm2, remote code only) falls back to llama; returns (dir, the
    family built)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = build_byte_tokenizer(tools)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=4096,
                 tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                 bos_token_id=None)  # fmt: skip
    built = family
    try:
        config = AutoConfig.for_model(family, **shape)
    except (ValueError, KeyError):
        built, config = "llama", AutoConfig.for_model("llama", **shape)
    if head == "classifier":
        config.num_labels = 1
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if head == "classifier" else AutoModelForCausalLM
    model = cls.from_config(config)
    if head == "causal":
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, built
