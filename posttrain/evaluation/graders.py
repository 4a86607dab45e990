"""Benchmark graders: (completion, gold answer) -> Verdict(extracted answer, correct), registered by name.

- `math_verify`: symbolic equivalence by math-verify (LaTeX, \\boxed{}, fractions, intervals); for MATH-style sets.
- `boxed_strict`: lenient final-box check: only a `\\boxed{}` in the last 300 characters counts, compared by
  math-verify (0.5 is right for \\frac12). Not the official NFT/DAPO verifier.
- `dapo_strict`: DAPO's official strict verifier (NFT's reward): the last closed `\\boxed{}` in the final 100
  characters, its content equal to the gold string character for character.
- `numeric_match`: the completion's last number equals the gold's exactly; cheap, for numeric answers.
- `gsm8k_strict` / `gsm8k_flexible`: lm-evaluation-harness's GSM8K `strict-match` and `flexible-extract` filters
  followed by its `exact_match` metric, reproduced so scores compare with published lm-eval GSM8K numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.errors import DataError, RecipeError, unknown_key
from reward_models.math import (
    GoldAnswerError,
    as_decimal,
    check_boxed_strict,
    check_dapo_strict,
    check_math_answer,
    extract_last_number,
)


@dataclass(frozen=True)
class Verdict:
    extracted: str | None  # the answer the grader read from the completion; None when it found none
    correct: bool


def math_verify_grader(completion: str, gold: str) -> Verdict:
    """Correct when math-verify finds the completion's answer equivalent to the gold (gold first, as it expects).

    The decision is `reward_models.math.check_math_answer`, the one the `math_verify` training reward makes."""
    try:
        extracted, correct = check_math_answer(completion, gold)
    except GoldAnswerError as err:
        raise DataError(f"grader 'math_verify': cannot parse the gold answer {gold!r}") from err
    return Verdict(extracted, correct)


def boxed_strict_grader(completion: str, gold: str) -> Verdict:
    """Correct only when the completion's last `\\boxed{}` in its final 300 characters is equivalent to the gold by
    math-verify (`reward_models.math.check_boxed_strict`, the `boxed_strict` reward's decision). Lenient: not the
    official DAPO/NFT rule (`dapo_strict_grader`)."""
    try:
        extracted, correct = check_boxed_strict(completion, gold)
    except GoldAnswerError as err:
        raise DataError(f"grader 'boxed_strict': cannot parse the gold answer {gold!r}") from err
    return Verdict(extracted, correct)


def dapo_strict_grader(completion: str, gold: str) -> Verdict:
    """DAPO's official strict verifier (`reward_models.math.check_dapo_strict`, the `dapo_strict` reward's decision):
    correct only when the last closed `\\boxed{}` in the completion's final 100 characters holds exactly the gold
    string (`\\boxed{12.0}` and `\\boxed{ 12 }` are wrong for gold "12")."""
    return Verdict(*check_dapo_strict(completion, gold))


def numeric_match_grader(completion: str, gold: str) -> Verdict:
    """Correct when the completion's last number equals the gold's last number as decimals (132 == 132.0,
    132 != 1322); thousands separators and `$` are ignored. A full GSM8K solution works as gold (its last
    number is the one after `####`)."""
    extracted = extract_last_number(completion)
    pred, ref = as_decimal(extracted), as_decimal(extract_last_number(gold))
    return Verdict(extracted, pred is not None and ref is not None and pred == ref)


# lm-evaluation-harness, read at these commits:
#   lm_eval/tasks/gsm8k/gsm8k.yaml @ 47f16bf6a68ec19467e728ce52ac6c5937d5b3da (version 3.0): filters and metric args
#   lm_eval/filters/extraction.py @ a06c80e63936672a57bfd2deda7b4b99c94bf4c8: RegexFilter (findall, group_select,
#       first non-empty group of a tuple match, strip, fallback "[invalid]")
#   lm_eval/api/metrics.py @ a4d16d3671e9cfef9d2dadd635bc659150fdb0d7: exact_match_hf_evaluate (re.sub each
#       ignore-regex on prediction and reference in order, then lower-case, then string equality)
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
_FALLBACK = "[invalid]"


def _regex_filter(text: str, pattern: re.Pattern, group_select: int) -> str:
    matches = pattern.findall(text)
    if not matches:
        return _FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        match = groups[0] if groups else _FALLBACK
    return match.strip()


def _exact_match_normalize(text: str) -> str:
    # exact_match with ignore_case=true, ignore_punctuation=false and the GSM8K regexes_to_ignore.
    for pattern in _GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def _gsm8k_verdict(filtered: str, gold: str) -> Verdict:
    # lm-eval compares the fallback "[invalid]" like any string; it never equals a numeric gold, so it is wrong.
    pred = _exact_match_normalize(filtered)
    correct = pred == _exact_match_normalize(gold)
    return Verdict(None if filtered == _FALLBACK else pred, correct)


def gsm8k_strict_grader(completion: str, gold: str) -> Verdict:
    """lm-eval GSM8K `strict-match`: the first `#### <number>` in the completion, then `exact_match` against the
    gold (a full GSM8K solution or the bare answer: the `(?s).*#### ` ignore-regex reduces both to the number)."""
    return _gsm8k_verdict(_regex_filter(completion, _GSM8K_STRICT, 0), gold)


def gsm8k_flexible_grader(completion: str, gold: str) -> Verdict:
    """lm-eval GSM8K `flexible-extract`: the last number-like span in the completion, then `exact_match`.
    Exact string match after removing `,`, `$` and one trailing `.`: "18.00" is wrong for gold 18, as in lm-eval."""
    return _gsm8k_verdict(_regex_filter(completion, _GSM8K_FLEXIBLE, -1), gold)


GRADERS: dict[str, Callable[[str, str], Verdict]] = {
    "math_verify": math_verify_grader,
    "boxed_strict": boxed_strict_grader,
    "dapo_strict": dapo_strict_grader,
    "numeric_match": numeric_match_grader,
    "gsm8k_strict": gsm8k_strict_grader,
    "gsm8k_flexible": gsm8k_flexible_grader,
}


def get_grader(name: str) -> Callable[[str, str], Verdict]:
    """A grader by name; an unknown name is a RecipeError with the closest known name."""
    if name not in GRADERS:
        raise RecipeError(unknown_key(name, sorted(GRADERS), noun="grader"))
    return GRADERS[name]


def grade_batch(name: str, completions: list[str], golds: list[str]) -> list[Verdict]:
    """Grade `completions[i]` against `golds[i]` with the grader `name`."""
    if len(completions) != len(golds):
        raise ValueError(f"grade_batch: {len(completions)} completions but {len(golds)} gold answers")
    grader = get_grader(name)
    return [grader(completion, str(gold)) for completion, gold in zip(completions, golds)]
