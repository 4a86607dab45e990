"""Verifiable math rewards: exact numeric match, and math-verify's symbolic equivalence (gold first)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from reward_models.errors import RewardError
from reward_models.registry import register, text_of

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_last_number(text: str) -> str | None:
    """The last number in `text` with thousands separators and `$` removed ("$1,000." -> "1000")."""
    matches = _NUMBER.findall(text.replace("$", ""))
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def as_decimal(text: str | None) -> Decimal | None:
    """`text` as a Decimal, or None when it is None or not a number (shared with the eval graders)."""
    if text is None:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _answers(answer: Any, n: int, name: str) -> list[Any]:
    if answer is None:
        raise RewardError(
            f"reward '{name}' needs an 'answer' column in the data (map one with data.train.columns, "
            "e.g. columns: {answer: <column>})"
        )
    if isinstance(answer, (str, bytes, int, float)):
        return [answer] * n  # one gold answer bound for every completion (rewards[].kwargs.answer)
    golds = list(answer)
    if len(golds) != n:
        raise RewardError(f"reward '{name}': got {len(golds)} answers for {n} completions")
    return golds


@register("numeric_match")
def numeric_match_reward(prompts: list, completions: list, answer: Any = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion's last number equals the gold answer exactly (132 == 132.0, 132 != 1322)."""
    golds = _answers(answer, len(completions), "numeric_match")
    scores = []
    for completion, gold in zip(completions, golds):
        ref = as_decimal(extract_last_number(str(gold)))
        if ref is None:  # a data problem, not a wrong completion: scoring it 0.0 would hide it
            raise RewardError(f"reward 'numeric_match': the gold answer {str(gold)[:200]!r} has no number")
        pred = as_decimal(extract_last_number(text_of(completion)))
        scores.append(1.0 if pred is not None and pred == ref else 0.0)
    return scores


@register("math_verify")
def math_verify_reward(prompts: list, completions: list, answer: Any = None, **kwargs: Any) -> list[float]:
    """1.0 when math-verify finds the completion's answer equivalent to the gold answer (LaTeX, \\boxed{}, numbers)."""
    from math_verify import parse, verify

    golds = _answers(answer, len(completions), "math_verify")
    # math-verify's timeouts use signals, which only work in the main thread; elsewhere run without them.
    main = threading.current_thread() is threading.main_thread()
    parse_kw = {} if main else {"parsing_timeout": None}
    verify_kw = {} if main else {"timeout_seconds": None}
    parsed_golds: dict[str, list] = {}  # GRPO repeats each gold num_generations times; parse it once
    scores = []
    for completion, gold in zip(completions, golds):
        gold_text = str(gold)
        if gold_text not in parsed_golds:
            parsed_golds[gold_text] = _parse_gold(gold_text, parse, parse_kw)
        pred = parse(text_of(completion), **parse_kw)
        # Gold first: verify() is not symmetric (math-verify's README: "Order here is important!").
        scores.append(1.0 if pred and verify(parsed_golds[gold_text], pred, **verify_kw) else 0.0)
    return scores


def _parse_gold(gold_text: str, parse: Callable, parse_kw: dict[str, Any]) -> list:
    # A bare gold answer ("\\left( 3, \\frac{\\pi}{2} \\right)", "p - q") parses reliably only inside a LaTeX
    # environment: as plain text math-verify parses 51 of the 500 MATH-500 answers to nothing and 57 to the wrong
    # value. Boxed, all 500 verify against "$\\boxed{answer}$" completions. Plain text stays as a fallback.
    gold_parsed = parse(f"$\\boxed{{{gold_text}}}$", **parse_kw) or parse(gold_text, **parse_kw)
    if not gold_parsed:  # every completion would score 0.0: a data problem, so say so
        raise RewardError(f"reward 'math_verify': math-verify cannot parse the gold answer {gold_text[:200]!r}")
    return gold_parsed
