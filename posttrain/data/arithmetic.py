"""Synthetic addition with a demonstration-corruption knob: the quickstart's task.

Problems are `a+b=` with `digits`-digit operands. The space of ordered pairs is split into train and eval by a
seeded permutation, so held-out problems are never trained on. In the train split, a seeded `carry_drop` share
of the problems that need a carry get a demonstration with every inter-column carry dropped (47+85= -> 122),
which imitation learns faithfully and a verifier can catch.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

SPLITS = ("train", "eval")
MAX_DIGITS = 3  # 4 digits would be 81M pairs, too many to enumerate and permute in memory


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


def is_corrupted(seed: int, a: int, b: int, carry_drop: float) -> bool:
    """Whether problem a+b gets a dropped-carry demonstration in the train split (carry problems only)."""
    # A cryptographic hash of (seed, a, b), not a shared RNG stream, so every call and every subset agrees on each
    # problem. Not crc32: it is affine in its input, so seed 1 flipped exactly the seed-0 choices.
    digest = hashlib.blake2b(f"{seed}:{a}+{b}".encode(), digest_size=8).digest()
    # One-digit sums have no column to drop a carry into, so they are never corrupted.
    dropped = has_carry(a, b) and drop_carry_sum(a, b) != a + b
    return dropped and int.from_bytes(digest, "big") / 2**64 < carry_drop


def arithmetic_split(
    split: str,
    *,
    n: int | None = None,
    seed: int = 0,
    digits: int = 2,
    carry_drop: float = 0.0,
    eval_fraction: float = 0.2,
) -> Dataset:
    """Rows with prompt ("47+85="), answer ("132"), completion (the demonstration), carry and corrupted.

    The eval split is the first round(eval_fraction * size) pairs of a `seed`-permuted problem space, train the
    rest; `n` takes the first n of the split in that order. Only train demonstrations are ever corrupted.
    """
    from datasets import Dataset

    _check_options(split, n, seed, digits, carry_drop, eval_fraction)
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
        corrupted = split == "train" and is_corrupted(seed, a, b, carry_drop)
        rows.append(
            {
                "prompt": f"{a}+{b}=",
                "answer": str(a + b),
                "completion": str(drop_carry_sum(a, b) if corrupted else a + b),
                "carry": has_carry(a, b),
                "corrupted": corrupted,
            }
        )
    return Dataset.from_list(rows)


def _check_options(split: str, n: Any, seed: Any, digits: Any, carry_drop: Any, eval_fraction: Any) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if split not in SPLITS:
        raise DataError(f"arithmetic: split must be 'train' or 'eval', got '{split}'")
    if n is not None and not (is_int(n) and n >= 1):
        raise DataError(f"arithmetic: n must be a positive integer (or left out for the whole split), got {n!r}")
    if not is_int(seed):
        raise DataError(f"arithmetic: seed must be an integer, got {seed!r}")
    if not (is_int(digits) and 1 <= digits <= MAX_DIGITS):
        raise DataError(f"arithmetic: digits must be an integer from 1 to {MAX_DIGITS}, got {digits!r}")
    if not (is_number(carry_drop) and 0.0 <= carry_drop <= 1.0):
        raise DataError(f"arithmetic: carry_drop must be in [0, 1], got {carry_drop!r}")
    if not (is_number(eval_fraction) and 0.0 < eval_fraction < 1.0):
        raise DataError(f"arithmetic: eval_fraction must be in (0, 1), got {eval_fraction!r}")
