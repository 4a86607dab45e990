"""Verifiable math rewards: exact numeric match, math-verify's symbolic equivalence (gold first), and DAPO's official
strict final-box check.

`check_math_answer(completion, gold)` is the one place that decides whether a completion's math answer is right by
math-verify: the `math_verify` reward here and posttrain's `math_verify` evaluation grader both call it.
`check_boxed_strict` (lenient: math-verify on the last box) and `check_dapo_strict` (official: raw string equality)
decide the `boxed_strict` and `dapo_strict` rewards and graders.
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


# Markers a completion uses to state its final answer; the one that occurs last in the text wins, except that of
# several `####` the first counts (as lm-eval's strict-match takes the first): a rollout without a stop string can
# run on into a made-up next question with its own `####`.
_HASHES = re.compile(r"####[ \t]*([^\n]*)")  # GSM8K's "#### 72" (the format the GSM8K 5-shot prompt teaches)
_FINAL_IS = re.compile(r"final answer is[ \t:]*([^\n]*)", re.IGNORECASE)  # Minerva/MATH's "The final answer is $x$."
_PLAIN_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
# A plain fraction right before punctuation ("14/3."): math-verify reads "3." as the float 3.0 and the fraction as
# 14/3.0, which fails against an exact 14/3.
_FRACTION_PUNCT = re.compile(r"(?<![\w.])(-?\d+\s*/\s*\d+)[.,;:!?]+(?=\s|$)")
# A plain mixed number ("2 1/2"): math-verify reads it as the product 2 * 1/2 = 1. (LaTeX "2\frac{1}{2}" it reads
# as 5/2 already.)
_MIXED = re.compile(r"(-?)(\d+)[ \t]+(\d+)[ \t]*/[ \t]*(\d+)")
# A number with a base subscript ("52_8", "4210_{5}", "A4_{11}"): math-verify drops the subscript.
_BASE_NUMBER = re.compile(r"(?<![\w\\])[0-9A-Z]*\d[0-9A-Z]*_(?:(\d+)|\{\s*(\d+)\s*\})")
_PERCENT = re.compile(r"\\?%")


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


def _as_mixed_fraction(answer: str) -> str | None:
    """A marked answer that is a plain mixed number ("2 1/2", "-3 1/4.", "$2 1/2$") as a fraction ("5/2"), else
    None."""
    match = _MIXED.fullmatch(answer.strip().rstrip(".").strip("$ "))
    if match is None or int(match[4]) == 0:
        return None
    sign, whole, num, den = match[1], int(match[2]), int(match[3]), int(match[4])
    return f"{sign}{whole * den + num}/{den}"


def final_answer_text(completion: str) -> str | None:
    """The part of `completion` that states its final answer when it marks one, else None: the last `\\boxed{}`,
    the rest of the line after the first `####`, or after the last "final answer is" — whichever comes last.
    Worked solutions carry other numbers on earlier lines; math-verify on the whole text sometimes takes one of
    those (e.g. "$4.00 + $2.00 = $6.00 ... #### 6" read as 4.00). A plain mixed number is returned as a fraction
    ("#### 2 1/2" -> "5/2")."""
    found: list[tuple[int, str]] = []
    boxed = last_boxed(completion)
    if boxed is not None:
        found.append((completion.rfind("\\boxed{"), _as_mixed_fraction(boxed[7:-1]) or f"${boxed}$"))
    for pattern, pick in ((_HASHES, 0), (_FINAL_IS, -1)):
        matches = list(pattern.finditer(completion))
        if matches:
            answer = matches[pick].group(1).strip()
            if _PLAIN_NUMBER.fullmatch(answer.rstrip(".")):  # "1,234" is a number, not a tuple; "$18." is 18
                answer = answer.rstrip(".").replace(",", "").replace("$", "")
            found.append((matches[pick].start(), _as_mixed_fraction(answer) or answer))
    return max(found)[1] if found else None


def _last_base(text: str) -> int | None:
    """The base subscript of the last base-subscripted number in `text` ("52_{8}" -> 8), or None."""
    matches = list(_BASE_NUMBER.finditer(text))
    return int(next(base for base in matches[-1].groups() if base)) if matches else None


def _verify(gold: str, text: str) -> tuple[list, bool]:
    """math-verify's parse of `text` and whether it is equivalent to `gold`, with two rules math-verify lacks:

    - percent signs (`%`, `\\%`) are dropped on both sides, so a percentage compares as the number written:
      `25%` is right for gold 25 and `25\\%`, wrong for 0.25 (math-verify accepts both);
    - a gold with a base subscript (`52_8`, `4210_{5}`) needs the same base on the answer's last base-subscripted
      number, an unmarked number being base 10: `52_9` and `52` are wrong for `52_8` (math-verify reads all as 52).
    Raises GoldAnswerError when the gold cannot be parsed."""
    from math_verify import parse, verify

    gold_parsed = parse_gold(_PERCENT.sub("", gold))
    parse_kw, verify_kw = _math_verify_kwargs()
    pred = parse(_PERCENT.sub("", text), **parse_kw)
    if not pred:
        return pred, False
    gold_base, pred_base = _last_base(gold), _last_base(text)
    if gold_base is not None and (10 if pred_base is None else pred_base) != gold_base:
        return pred, False
    return pred, bool(verify(gold_parsed, pred, **verify_kw))


def check_math_answer(completion: str, gold: str) -> tuple[str | None, bool]:
    """(the answer math-verify reads in `completion` or None, whether it is equivalent to `gold`).

    When the completion marks its final answer (`final_answer_text`), that answer is the one graded; otherwise
    math-verify reads the whole text. A plain fraction before punctuation ("14/3.") is read as the fraction.
    Gold first: verify() is not symmetric (math-verify's README: "Order here is important!"). Percentages and base
    subscripts follow `_verify`'s rules. Raises GoldAnswerError when the gold can't be parsed. Works outside the
    main thread (without math-verify's timeouts).
    """
    marked = final_answer_text(completion)
    text = _FRACTION_PUNCT.sub(r"\1", completion if marked is None else marked)
    pred, correct = _verify(gold, text)
    return (str(pred[0]), correct) if pred else (None, False)


BOXED_TAIL_CHARS = 300  # the lenient boxed_strict's window: the last 300 characters


def check_boxed_strict(completion: str, gold: str) -> tuple[str | None, bool]:
    """The lenient final-box check: only a `\\boxed{}` in the completion's last 300 characters counts (the last one
    there); no box, no credit, whatever numbers the text holds. The boxed content is compared with the gold by
    math-verify's equivalence (with `_verify`'s percent and base rules), so 0.5 is right for \\frac12. This is NOT
    the official NFT/DAPO verifier (that is `check_dapo_strict`: the last 100 characters, raw string equality)."""
    boxed = last_boxed(completion[-BOXED_TAIL_CHARS:])
    if boxed is None:
        parse_gold(_PERCENT.sub("", gold))  # a bad gold is a data problem whether or not a box was found
        return None, False
    pred, correct = _verify(gold, _as_mixed_fraction(boxed[7:-1]) or f"${boxed}$")
    return (str(pred[0]), correct) if pred else (boxed, False)


# DAPO's strict verifier as the official NFT run uses it. NVlabs/NFT verifier.py
# (@ed8e5b0972af113a6ac38c6c6065349e0f32c070): data_source 'math_dapo_boxed' ->
# math_dapo.compute_score(solution_str, ground_truth, strict_box_verify=True). Transcribed from
# verl/utils/reward_score/math_dapo.py as read at volcengine/verl@012542c42542738709ccd0db619cff949cb0337a,
# CarnegieBin/DAPO@a488b06de263eca7bed626953e114003ad711f29 and
# rqzhangberkeley/DAPO@79e11da2ff01a96634725f2c2aa4fde7279c595f
# (the strict path is the same in all three; NFT pins verl@01ef7184821d0d7844796ec0ced17665c1f50673, not read):
# compute_score keeps solution_str[-300:], is_correct_strict_box then pred[-100:], last_boxed_only_string (rfind
# "\boxed{", braces counted until closed; None if never closed), remove_boxed, and `extracted == ground_truth`:
# raw strings, no normalisation (normalize_final_answer serves only the non-strict Minerva path). Score +1 / -1.
DAPO_TAIL_CHARS = 300
DAPO_BOX_CHARS = 100


def check_dapo_strict(completion: str, gold: str) -> tuple[str | None, bool]:
    """DAPO's official strict box verifier: (the content of the last closed `\\boxed{}` in the completion's final
    100 characters or None, whether it equals `gold` character for character). `\\boxed{ 12 }`, `\\boxed{12.0}`
    and `\\boxed{x = 12}` are all wrong for gold "12"; a box that starts before the last 100 characters is not seen.
    One deviation: without a box the official code compares the placeholder "[INVALID]" with the gold; here no box
    is always wrong."""
    boxed = last_boxed(completion[-DAPO_TAIL_CHARS:][-DAPO_BOX_CHARS:])
    if boxed is None:
        return None, False
    extracted = boxed[len("\\boxed{") : -1]
    return extracted, extracted == gold


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
    equivalence, so lenient: `\\boxed{0.5}` is right for \\frac12); no box there is 0.0. Not the official NFT/DAPO
    verifier, which compares raw strings in the last 100 characters: that is `dapo_strict`."""
    golds = _answers(answer, len(completions), "boxed_strict")
    scores = []
    for completion, gold in zip(completions, golds):
        try:
            correct = check_boxed_strict(text_of(completion), str(gold))[1]
        except GoldAnswerError as err:
            raise RewardError(f"reward 'boxed_strict': {err}") from err
        scores.append(1.0 if correct else 0.0)
    return scores


@register("dapo_strict", columns=("answer",))
def dapo_strict_reward(prompts: list, completions: list, answer: Any = None, **kwargs: Any) -> list[float]:
    """+1.0 when the last closed `\\boxed{}` in the completion's final 100 characters holds exactly the gold string,
    else -1.0 (`check_dapo_strict`): the official DAPO strict verifier and its scores, as NVlabs/NFT trains with it.
    NFT's `correct_threshold: 0.5` reads +1 as correct and -1 as wrong. Under GRPO, std-scaled advantages equal
    those of 1/0 scores; unscaled ones (Dr. GRPO) are twice as large."""
    golds = _answers(answer, len(completions), "dapo_strict")
    return [1.0 if check_dapo_strict(text_of(c), str(g))[1] else -1.0 for c, g in zip(completions, golds)]
