"""`dapo_strict` (reward and grader) against an independent restatement of DAPO's official strict verifier, case by
case: the issue's cases, the 100-character window's edge, and a few hundred generated completions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posttrain.evaluation.graders import Verdict, get_grader
from reward_models.errors import RewardError
from reward_models.math import check_dapo_strict, dapo_strict_reward
from tests.test_graders import _bump_digit

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FIXTURES = Path(__file__).parent / "fixtures"


# ---- the official rule, restated in our own words and code (no upstream code is copied): verl's
# verl/utils/reward_score/math_dapo.py, `compute_score(solution_str, ground_truth, strict_box_verify=True)`, read at
# volcengine/verl@012542c42542738709ccd0db619cff949cb0337a (the strict path is the same at
# CarnegieBin/DAPO@a488b06de263eca7bed626953e114003ad711f29 and rqzhangberkeley/DAPO@79e11da2ff01a96634725f2c2aa4fde7279c595f);
# NVlabs/NFT's verifier.py calls it for data_source 'math_dapo_boxed'. The rule: keep the last 300 characters, then
# the last 100 of those; take the last occurrence of "\boxed{" there; its content runs to the brace that brings the
# nesting back to zero (none: no answer, placeholder "[INVALID]"); correct iff that content equals the gold string
# exactly, no normalisation; score +1 or -1. Written differently from reward_models.math.check_dapo_strict (a stack
# of open braces, scanning forward from the box), so the two are independent checks of the same rule.

_OPEN = "\\boxed{"


def compute_score(solution_str: str, ground_truth: str) -> dict:
    window = solution_str[-300:][-100:]
    start = window.rfind(_OPEN)
    pred = "[INVALID]"
    if start >= 0:
        stack = ["{"]
        for offset, char in enumerate(window[start + len(_OPEN) :]):
            if char == "{":
                stack.append(char)
            elif char == "}":
                stack.pop()
                if not stack:
                    pred = window[start + len(_OPEN) : start + len(_OPEN) + offset]
                    break
    correct = pred == ground_truth
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


# ---- the comparison


def _agrees(completion: str, gold: str) -> tuple[str | None, bool]:
    official = compute_score(completion, gold)
    extracted, correct = check_dapo_strict(completion, gold)
    assert correct == official["acc"], (completion, gold, official)
    assert (extracted if extracted is not None else "[INVALID]") == official["pred"], (completion, gold, official)
    assert get_grader("dapo_strict")(completion, gold) == Verdict(extracted, correct)
    assert dapo_strict_reward([""], [completion], answer=[gold]) == [official["score"]]
    return extracted, correct


PAD = "We add the two numbers and check the result once more. "  # 55 characters


@pytest.mark.parametrize(
    ("completion", "gold", "extracted", "right"),
    [("So the answer is $\\boxed{12}$.", "12", "12", True),
     ("So the answer is $\\boxed{12.0}$.", "12", "12.0", False),  # raw strings: 12.0 is not 12
     ("So the answer is $\\boxed{ 12 }$.", "12", " 12 ", False),  # not even stripped
     ("So the answer is $\\boxed{x = 12}$.", "12", "x = 12", False),
     ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "\\frac{1}{2}", True),  # nested braces
     ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac12", "\\frac{1}{2}", False),
     ("So the answer is $\\boxed{0.5}$.", "\\frac{1}{2}", "0.5", False),  # boxed_strict would accept it
     ("So the answer is $\\boxed{\\frac{1}{2}$.", "\\frac{1}{2}", None, False),  # never closed
     ("So the answer is $\\boxed{12", "12", None, False),
     ("First \\boxed{5}, then \\boxed{12}.", "12", "12", True),  # two boxes: the last counts
     ("First \\boxed{12}, then \\boxed{5}.", "12", "5", False),
     ("First \\boxed{12}, then \\boxed{5", "12", None, False),  # the last box is unclosed: no answer at all
     ("\\boxed{12}" + "x" * 90, "12", "12", True),  # the box starts 100 characters from the end: seen
     ("\\boxed{12}" + "x" * 91, "12", None, False),  # 101: its backslash is cut off, so no "\boxed{" is left
     ("\\boxed{12}" + " I double-checked every step of this, and I am confident." * 2, "12", None, False),  # ~120
     ("The answer is 12.", "12", None, False),  # no box: wrong, whatever the text says
     ("", "12", None, False),
     ("\\boxed{}", "", "", True)],
)  # fmt: skip
def test_the_issues_cases_agree_with_the_official_verifier(completion, gold, extracted, right):
    assert _agrees(completion, gold) == (extracted, right)


def test_the_window_edge_exactly():
    box = "$\\boxed{12}$"
    for pad in range(80, 101):
        completion = PAD * 2 + box + "." * pad  # seen up to pad = 89: its backslash is then 100 from the end
        assert check_dapo_strict(completion, "12")[1] is (pad <= 89)
        _agrees(completion, "12")
    assert check_dapo_strict("\\boxed{12}" + "." * 90, "12") == ("12", True)
    assert check_dapo_strict("\\boxed{12}" + "." * 91, "12") == (None, False)
    assert check_dapo_strict("\\boxed{12}" + "." * 300, "12") == (None, False)  # past the 300 cut too


def _golds() -> list[str]:
    for path in (SHARED / "math500_test.jsonl", FIXTURES / "math500_test_sample.jsonl"):
        if path.exists():
            return [json.loads(line)["answer"] for line in path.read_text().splitlines() if line.strip()]
    return ["12", "\\frac{1}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "52_8"]


_VARIANTS = [
    lambda g, r: f"\\boxed{{{g}}}",
    lambda g, r: f"$\\boxed{{{g}}}$.",
    lambda g, r: f"\\boxed{{ {g} }}",
    lambda g, r: f"\\boxed{{{g}.0}}",
    lambda g, r: f"\\boxed{{x = {g}}}",
    lambda g, r: f"\\boxed{{{g}",  # unclosed
    lambda g, r: f"\\boxed{{{g}}} or \\boxed{{{r.randint(0, 99)}}}",
    lambda g, r: f"\\boxed{{{r.randint(0, 99)}}} or rather \\boxed{{{g}}}",
    lambda g, r: f"\\boxed{{{{{g}}}}}",  # doubled braces
    lambda g, r: f"\\boxed {{{g}}}",  # a space after \boxed: not "\boxed{"
    lambda g, r: f"\\fbox{{{g}}}",
]
_FILLER = "Let x be the unknown; then 2x + 3 = 11 gives x = 4, so {braces} and $a_1$ follow. "


def _generated(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng, golds = random.Random(seed), _golds()
    cases = []
    for _ in range(n):
        gold = rng.choice(golds)
        prefix = (_FILLER * 8)[: rng.randint(0, 400)]
        suffix = (_FILLER * 3)[rng.randint(0, 60) :][: rng.randint(0, 150)]
        cases.append((prefix + rng.choice(_VARIANTS)(gold, rng) + suffix, gold))
    return cases


def test_generated_completions_agree_with_the_official_verifier():
    cases = _generated(600)
    verdicts = [_agrees(completion, gold)[1] for completion, gold in cases]
    # the generator covers both outcomes, not only one
    assert 0.1 < sum(verdicts) / len(verdicts) < 0.9


def test_math500_boxed_answers_digit_changes_and_reference_solutions():
    path = SHARED / "math500_test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not available")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    golds = [r["answer"] for r in rows]
    assert all(_agrees(f"... so the answer is $\\boxed{{{g}}}$.", g) == (g, True) for g in golds)
    for which in (0, -1):  # the first or the last digit + 1 (mod 10), or "+1" appended: never equal
        assert not any(_agrees(f"... so the answer is $\\boxed{{{_bump_digit(g, which)}}}$.", g)[1] for g in golds)
    verdicts = [_agrees(r["solution"], r["answer"]) for r in rows]
    # 455 / 500: each of the other 45 solutions writes on for more than 100 characters after its box
    assert sum(correct for _, correct in verdicts) == 455
    assert all(extracted is None for extracted, correct in verdicts if not correct)


def test_reward_scores_are_plus_and_minus_one_and_read_conversational_completions():
    completion = [{"role": "assistant", "content": "so $\\boxed{7}$"}]
    assert dapo_strict_reward(["q", "q"], [completion, "so $\\boxed{8}$"], answer=["7", "7"]) == [1.0, -1.0]
    assert dapo_strict_reward(["q"], ["\\boxed{7}"], answer=7) == [1.0]  # a bound gold, as a number
    with pytest.raises(RewardError, match="needs an 'answer' column"):
        dapo_strict_reward(["q"], ["\\boxed{7}"])


def test_it_is_stricter_than_the_lenient_boxed_strict():
    lenient = get_grader("boxed_strict")
    for completion, gold in [("\\boxed{0.5}", "\\frac{1}{2}"), ("\\boxed{ 12 }", "12"), ("\\boxed{12.0}", "12")]:
        assert lenient(completion, gold).correct and not get_grader("dapo_strict")(completion, gold).correct
