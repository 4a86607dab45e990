"""Synthetic addition with a demonstration-corruption knob: the quickstart's task.

Problems are `a+b=` with `digits`-digit operands. The space of ordered pairs is split into train and eval by a
seeded permutation, so held-out problems are never trained on. In the train split, a seeded `carry_drop` share
of the problems that need a carry get a demonstration with every inter-column carry dropped (47+85= -> 122),
which imitation learns faithfully and a verifier can catch.
"""

from __future__ import annotations

import random
import zlib

from posttrain.errors import DataError


def has_carry(a: int, b: int) -> bool:
    """True when the units digits carry into the tens."""
    return (a % 10) + (b % 10) >= 10


def drop_carry_sum(a: int, b: int) -> int:
    """Column-wise sum ignoring carries between columns; the top column keeps its full sum (47+85 -> 122)."""
    result, place = 0, 1
    while a >= 10 or b >= 10:
        result += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return result + (a + b) * place


def _corrupted(seed: int, a: int, b: int, share: float) -> bool:
    # A hash of (seed, a, b), not a shared RNG stream, so every call and every subset agrees on each problem.
    h = zlib.crc32(f"{seed}:{a}+{b}".encode()) / 2**32
    return h < share


def arithmetic_split(
    split: str,
    *,
    n: int | None = None,
    seed: int = 0,
    digits: int = 2,
    carry_drop: float = 0.0,
    eval_fraction: float = 0.2,
):
    """Rows with prompt, answer, completion (the demonstration), carry, corrupted."""
    from datasets import Dataset

    if split not in ("train", "eval"):
        raise DataError(f"arithmetic: split must be 'train' or 'eval', got '{split}'")
    if not 0.0 <= carry_drop <= 1.0:
        raise DataError(f"arithmetic: carry_drop must be in [0, 1], got {carry_drop}")
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"arithmetic: eval_fraction must be in (0, 1), got {eval_fraction}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    random.Random(seed).shuffle(pairs)
    n_eval = round(eval_fraction * len(pairs))
    chosen = pairs[:n_eval] if split == "eval" else pairs[n_eval:]
    if n is not None:
        if n > len(chosen):
            raise DataError(f"arithmetic: asked for n={n} {split} problems but the split has {len(chosen)}")
        chosen = chosen[:n]
    rows = []
    for a, b in chosen:
        carry = has_carry(a, b)
        corrupted = split == "train" and carry and _corrupted(seed, a, b, carry_drop)
        rows.append(
            {
                "prompt": f"{a}+{b}=",
                "answer": str(a + b),
                "completion": str(drop_carry_sum(a, b) if corrupted else a + b),
                "carry": carry,
                "corrupted": corrupted,
            }
        )
    return Dataset.from_list(rows)
