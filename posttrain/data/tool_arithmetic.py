"""Synthetic multiplication with a calculator tool: the task where RL teaches a tiny model to use a tool.

Problems are `a*b=` with a 3-digit `a` and a 2-digit `b` (81,000 pairs, split into train and eval by a seeded
permutation): beyond what a 0.3M-parameter model learns in minutes, trivial with `multiply(a, b)`
(posttrain.rollout.tools.multiply). Each train row carries an SFT demonstration in `messages`; a seeded
`tool_rate` share of them call the tool (assistant tool call -> tool result -> the answer), the rest write an
answer straight away: the demonstrator's own attempt, right for a seeded `direct_accuracy` share and otherwise off
in one digit, so imitation learns to use the tool only part of the time and to guess otherwise.

Rows: prompt (a one-message conversation), answer, messages, tools (the JSON schema list the template renders,
as TRL's SFT reads it), uses_tool.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

SPLITS = ("train", "eval")
TOOL = "multiply"


def multiply(a: int, b: int) -> int:
    """Multiply two integers exactly.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return int(a) * int(b)


def _fraction(seed: int, tag: str, a: int, b: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{tag}:{a}*{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def wrong_product(seed: int, a: int, b: int) -> int:
    """a*b with one digit changed (seeded per problem): a plausible wrong guess."""
    digits = list(str(a * b))
    rng = random.Random(f"{seed}:{a}*{b}")
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def tool_schemas() -> list[dict[str, Any]]:
    """The JSON schema of the task's tool, as the chat template gets it (transformers renders callables the same)."""
    from transformers.utils import get_json_schema

    return [get_json_schema(multiply)]


def demonstration(a: int, b: int, *, tool: bool, answer: int) -> list[dict[str, Any]]:
    """The SFT conversation for a*b: with `tool`, call multiply and answer with its result; else answer `answer`."""
    user = {"role": "user", "content": f"{a}*{b}="}
    if not tool:
        return [user, {"role": "assistant", "content": str(answer)}]
    call = {"type": "function", "function": {"name": TOOL, "arguments": {"a": a, "b": b}}}
    return [
        user,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": TOOL, "content": str(a * b)},
        {"role": "assistant", "content": str(a * b)},
    ]


def tool_arithmetic_split(split: str, **options: Any) -> Dataset:
    """Rows of `split` (see the module docstring); built once per process for the same options: validation, the
    dry-run plan and training read the same ~77k rows (seconds to build)."""
    try:
        hash(tuple(options.items()))
    except TypeError:  # an unhashable option value: the builder names it
        return _build(split, **options)
    return _cached(split, **options)


@functools.lru_cache(maxsize=8)
def _cached(split: str, **options: Any) -> Dataset:
    return _build(split, **options)


def _build(
    split: str,
    *,
    n: int | None = None,
    seed: int = 0,
    tool_rate: float = 0.3,
    direct_accuracy: float = 0.5,
    eval_fraction: float = 0.05,
) -> Dataset:
    from datasets import Dataset

    if split not in SPLITS:
        raise DataError(f"tool_arithmetic: split must be 'train' or 'eval', got '{split}'")
    for name, value in (("tool_rate", tool_rate), ("direct_accuracy", direct_accuracy)):
        if not (isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
            raise DataError(f"tool_arithmetic: {name} must be in [0, 1], got {value!r}")
    if not (isinstance(eval_fraction, int | float) and 0.0 < eval_fraction < 1.0):
        raise DataError(f"tool_arithmetic: eval_fraction must be in (0, 1), got {eval_fraction!r}")
    pairs = [(a, b) for a in range(100, 1000) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    n_eval = round(eval_fraction * len(pairs))
    chosen = pairs[:n_eval] if split == "eval" else pairs[n_eval:]
    if n is not None:
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= len(chosen)):
            raise DataError(f"tool_arithmetic: n must be an integer from 1 to {len(chosen)} for {split}, got {n!r}")
        chosen = chosen[:n]
    tools = json.dumps(tool_schemas())
    rows = []
    for a, b in chosen:
        uses_tool = _fraction(seed, "tool", a, b) < tool_rate
        right = _fraction(seed, "direct", a, b) < direct_accuracy
        answer = a * b if right else wrong_product(seed, a, b)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{a}*{b}="}],
                "answer": str(a * b),
                "messages": demonstration(a, b, tool=uses_tool, answer=answer),
                "tools": tools,
                "uses_tool": uses_tool,
            }
        )
    return Dataset.from_list(rows)
