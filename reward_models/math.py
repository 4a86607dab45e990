"""Verifiable math rewards: exact numeric match, and math-verify's symbolic equivalence (gold first).

`check_math_answer(completion, gold)` is the one place that decides whether a completion's math answer is right by
math-verify: the `math_verify` reward here and posttrain's `math_verify` evaluation grader both call it.
"""

from __future__ import annotations

import functools
import re
import threading
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


@register("numeric_match", columns=("answer",))
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


class GoldAnswerError(RewardError):
    """math-verify cannot parse a gold answer: every completion would be marked wrong, so it is a data problem."""

    def __init__(self, gold: str):
        super().__init__(f"math-verify cannot parse the gold answer {gold[:200]!r}")
        self.gold = gold


def _math_verify_kwargs() -> tuple[dict[str, Any], dict[str, Any]]:
    # math-verify's timeouts use signals (SIGALRM), which only work in the main thread; elsewhere run without them.
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


@functools.lru_cache(maxsize=4096)  # GRPO repeats each gold num_generations times: parse it once
def _parse_gold(gold: str, main_thread: bool) -> list:
    from math_verify import parse

    kwargs = {} if main_thread else {"parsing_timeout": None}
    # A bare gold answer ("\\left( 3, \\frac{\\pi}{2} \\right)", "p - q") parses reliably only inside a LaTeX
    # environment: as plain text math-verify parses 51 of the 500 MATH-500 answers to nothing and 57 to the wrong
    # value. Boxed, all 500 verify against "$\\boxed{answer}$" completions. Plain text stays as a fallback.
    return parse(f"$\\boxed{{{gold}}}$", **kwargs) or parse(gold, **kwargs)


def parse_gold(gold: str) -> list:
    """A gold answer parsed by math-verify (boxed first, plain text as a fallback), cached; GoldAnswerError when
    math-verify reads nothing in it."""
    parse_kw, _ = _math_verify_kwargs()
    parsed = _parse_gold(str(gold), not parse_kw)
    if not parsed:
        raise GoldAnswerError(str(gold))
    return parsed


# Markers a completion uses to state its final answer; the one that occurs last in the text wins.
_HASHES = re.compile(r"####[ \t]*([^\n]*)")  # GSM8K's "#### 72" (the format the GSM8K 5-shot prompt teaches)
_FINAL_IS = re.compile(r"final answer is[ \t:]*([^\n]*)", re.IGNORECASE)  # Minerva/MATH's "The final answer is $x$."
_PLAIN_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
# A plain fraction right before punctuation ("14/3."): math-verify reads "3." as the float 3.0 and the fraction as
# 14/3.0, which fails against an exact 14/3.
_FRACTION_PUNCT = re.compile(r"(?<![\w.])(-?\d+\s*/\s*\d+)[.,;:!?]+(?=\s|$)")


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` of `text` with its braces balanced, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    return None  # never closed


def final_answer_text(completion: str) -> str | None:
    """The part of `completion` that states its final answer when it marks one, else None: the last `\\boxed{}`,
    the rest of the line after the last `####`, or after the last "final answer is" — whichever comes last.
    Worked solutions carry other numbers on earlier lines; math-verify on the whole text sometimes takes one of
    those (e.g. "$4.00 + $2.00 = $6.00 ... #### 6" read as 4.00)."""
    found: list[tuple[int, str]] = []
    boxed = last_boxed(completion)
    if boxed is not None:
        found.append((completion.rfind("\\boxed{"), f"${boxed}$"))
    for pattern in (_HASHES, _FINAL_IS):
        matches = list(pattern.finditer(completion))
        if matches:
            answer = matches[-1].group(1).strip()
            if _PLAIN_NUMBER.fullmatch(answer.rstrip(".")):  # "1,234" is a number, not a tuple; "$18." is 18
                answer = answer.rstrip(".").replace(",", "").replace("$", "")
            found.append((matches[-1].start(), answer))
    return max(found)[1] if found else None


def check_math_answer(completion: str, gold: str) -> tuple[str | None, bool]:
    """(the answer math-verify reads in `completion` or None, whether it is equivalent to `gold`).

    When the completion marks its final answer (`final_answer_text`), that answer is the one graded; otherwise
    math-verify reads the whole text. A plain fraction before punctuation ("14/3.") is read as the fraction.
    Gold first: verify() is not symmetric (math-verify's README: "Order here is important!"). Raises
    GoldAnswerError when the gold can't be parsed. Works outside the main thread (without math-verify's timeouts).
    """
    from math_verify import parse, verify

    gold_parsed = parse_gold(gold)
    parse_kw, verify_kw = _math_verify_kwargs()
    marked = final_answer_text(completion)
    text = _FRACTION_PUNCT.sub(r"\1", completion if marked is None else marked)
    pred = parse(text, **parse_kw)
    if not pred:
        return None, False
    return str(pred[0]), bool(verify(gold_parsed, pred, **verify_kw))


BOXED_TAIL_CHARS = 300  # DAPO's strict verifier (verl math_dapo, strict_box_verify) reads the last 300 characters


def check_boxed_strict(completion: str, gold: str) -> tuple[str | None, bool]:
    """The strict final-box check of NFT/DAPO's math runs: only a `\\boxed{}` in the completion's last 300
    characters counts (the last one there); no box, no credit, whatever numbers the text holds. The boxed content
    is compared with the gold by math-verify's equivalence (DAPO compares Minerva-normalised strings instead: this
    accepts equivalent forms such as 0.5 for \\frac12 that it would reject)."""
    from math_verify import parse, verify

    gold_parsed = parse_gold(gold)
    boxed = last_boxed(completion[-BOXED_TAIL_CHARS:])
    if boxed is None:
        return None, False
    parse_kw, verify_kw = _math_verify_kwargs()
    pred = parse(f"${boxed}$", **parse_kw)
    if not pred:
        return boxed, False
    return str(pred[0]), bool(verify(gold_parsed, pred, **verify_kw))


def is_math_correct(completion: str, gold: str) -> bool:
    """Whether math-verify finds the answer in `completion` equivalent to `gold` (see `check_math_answer`)."""
    return check_math_answer(completion, gold)[1]


@register("math_verify", columns=("answer",))
def math_verify_reward(prompts: list, completions: list, answer: Any = None, **kwargs: Any) -> list[float]:
    """1.0 when math-verify finds the completion's answer equivalent to the gold answer (LaTeX, \\boxed{}, numbers)."""
    golds = _answers(answer, len(completions), "math_verify")
    scores = []
    for completion, gold in zip(completions, golds):
        try:
            correct = is_math_correct(text_of(completion), str(gold))
        except GoldAnswerError as err:  # every completion would score 0.0: a data problem, so say so
            raise RewardError(f"reward 'math_verify': {err}") from err
        scores.append(1.0 if correct else 0.0)
    return scores


@register("boxed_strict", columns=("answer",))
def boxed_strict_reward(prompts: list, completions: list, answer: Any = None, **kwargs: Any) -> list[float]:
    """1.0 when the completion's last `\\boxed{}` in its final 300 characters holds the gold answer (math-verify
    equivalence); no box there is 0.0: the strict final-box verifier of NFT's and DAPO's math runs."""
    golds = _answers(answer, len(completions), "boxed_strict")
    scores = []
    for completion, gold in zip(completions, golds):
        try:
            correct = check_boxed_strict(text_of(completion), str(gold))[1]
        except GoldAnswerError as err:
            raise RewardError(f"reward 'boxed_strict': {err}") from err
        scores.append(1.0 if correct else 0.0)
    return scores
