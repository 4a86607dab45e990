"""Graders and metrics: real-data claims on GSM8K and MATH-500, lm-eval GSM8K semantics, pass@k and friends."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from posttrain.errors import RecipeError
from posttrain.evaluation.graders import GRADERS, Verdict, get_grader, grade_batch
from posttrain.evaluation.metrics import aggregate, majority_answer, mean_stderr, pass_at_k

FIXTURES = Path(__file__).parent / "fixtures"
# The shared data dir sits beside the repo checkout (in CI too); tests on the full files skip without it.
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _rows(name: str, source: str) -> list[dict]:
    path = FIXTURES / f"{name}_test_sample.jsonl" if source == "fixture" else SHARED / f"{name}_test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not available")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gsm8k_gold(row: dict) -> str:
    return row["answer"].split("#### ")[-1].replace(",", "").strip()


def _bump_digit(answer: str, which: int) -> str:
    """`answer` with its digit number `which` (0 first, -1 last) increased by one mod 10, or "+1" appended."""
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    if not digits:
        return answer + "+1"
    i = digits[which]
    return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1 :]


def _check_rate(name: str, golds: list[str], completions: list[str], want_correct: bool, min_rate: float) -> None:
    verdicts = grade_batch("math_verify", completions, golds)
    misses = [(g, c, v) for g, c, v in zip(golds, completions, verdicts) if v.correct != want_correct]
    rate = 1 - len(misses) / len(golds)
    print(f"{name}: {len(golds) - len(misses)}/{len(golds)} graded {'correct' if want_correct else 'wrong'}")
    listing = "\n".join(f"  gold={g!r} completion={c!r} -> {v}" for g, c, v in misses[:30])
    assert rate >= min_rate, f"{name}: {rate:.4f} < {min_rate}; exceptions:\n{listing}"


# ---- real data: math_verify accepts the right answer and rejects a one-digit change ----


@pytest.mark.parametrize("source", ["fixture", "full"])
def test_math_verify_grades_gsm8k_answers_right_and_one_digit_changes_wrong(source):
    golds = [_gsm8k_gold(r) for r in _rows("gsm8k", source)]
    right = [f"Let's think step by step. ... The answer is {g}." for g in golds]
    wrong = [f"Let's think step by step. ... The answer is {_bump_digit(g, -1)}." for g in golds]
    _check_rate(f"gsm8k[{source}] right", golds, right, want_correct=True, min_rate=0.995)
    _check_rate(f"gsm8k[{source}] last digit +1", golds, wrong, want_correct=False, min_rate=0.99)


@pytest.mark.parametrize("source", ["fixture", "full"])
def test_math_verify_grades_math500_answers_right_and_one_digit_changes_wrong(source):
    golds = [r["answer"] for r in _rows("math500", source)]
    right = [f"... so the answer is $\\boxed{{{g}}}$." for g in golds]
    # The leading digit always changes the value; the last one can hit a unit exponent (cm^2), which math-verify
    # ignores (the next test measures that edit).
    wrong = [f"... so the answer is $\\boxed{{{_bump_digit(g, 0)}}}$." for g in golds]
    _check_rate(f"math500[{source}] right", golds, right, want_correct=True, min_rate=0.995)
    _check_rate(f"math500[{source}] first digit +1", golds, wrong, want_correct=False, min_rate=0.99)


@pytest.mark.parametrize("source", ["fixture", "full"])
def test_math_verify_grades_a_last_digit_change_wrong_base_subscripts_included(source):
    """The last digit also hits base subscripts (52_8 -> 52_9), which math-verify ignores; the base rule catches
    them. On MATH-500: 9 of 500 changed answers were graded correct before the rule, 3 after (two unit exponents,
    `15\\mbox{ cm}^2` -> `^3`, and `.0000672` -> `.0000673` under math-verify's 6-decimal rounding)."""
    golds = [r["answer"] for r in _rows("math500", source)]
    wrong = [f"... so the answer is $\\boxed{{{_bump_digit(g, -1)}}}$." for g in golds]
    _check_rate(f"math500[{source}] last digit +1", golds, wrong, want_correct=False, min_rate=0.99)
    verdicts = grade_batch("math_verify", wrong, golds)
    assert not [g for g, v in zip(golds, verdicts) if v.correct and "_" in g]  # no base answer slips through


@pytest.mark.parametrize("source", ["fixture", "full"])
@pytest.mark.parametrize("name", ["numeric_match", "gsm8k_strict", "gsm8k_flexible"])
def test_gsm8k_full_solution_gold_and_bare_gold_give_the_same_verdicts(name, source):
    rows = _rows("gsm8k", source)
    completions = [f"So she has {_gsm8k_gold(r)} left.\n#### {_gsm8k_gold(r)}" for r in rows]
    completions += [f"So she has {_bump_digit(_gsm8k_gold(r), -1)} left." for r in rows]
    full = grade_batch(name, completions, [r["answer"] for r in rows] * 2)
    bare = grade_batch(name, completions, [_gsm8k_gold(r) for r in rows] * 2)
    assert full == bare
    assert all(v.correct for v in full[: len(rows)])
    assert not any(v.correct for v in full[len(rows) :])


# ---- lm-eval GSM8K semantics ----


def test_gsm8k_strict_needs_the_hash_marker():
    assert get_grader("gsm8k_strict")("The answer is 72.", "72") == Verdict(None, False)
    assert get_grader("gsm8k_strict")("The answer is 72.\n#### 72", "72") == Verdict("72", True)
    # take the first `#### ` match, as lm-eval's group_select 0 does
    assert not get_grader("gsm8k_strict")("#### 5\n#### 72", "72").correct


def test_gsm8k_thousands_separators_and_dollars_are_ignored():
    assert get_grader("gsm8k_strict")("#### 1,234", "1234") == Verdict("1234", True)
    assert get_grader("gsm8k_strict")("#### 1,234.", "1,234") == Verdict("1234", True)
    assert get_grader("gsm8k_flexible")("She earns $1,234.", "1234") == Verdict("1234", True)


def test_gsm8k_flexible_takes_the_last_number():
    grade = get_grader("gsm8k_flexible")
    assert grade("3 apples and 4 pears make 7 fruits.", "7") == Verdict("7", True)
    assert grade("The answer is 7, not 3.", "7") == Verdict("3", False)


def test_gsm8k_no_number_is_invalid_and_wrong():
    for name in ("gsm8k_strict", "gsm8k_flexible"):
        assert get_grader(name)("I do not know.", "72") == Verdict(None, False)


def test_gsm8k_negative_numbers():
    assert get_grader("gsm8k_strict")("#### -5", "-5") == Verdict("-5", True)
    assert not get_grader("gsm8k_strict")("#### 5", "-5").correct
    assert get_grader("gsm8k_flexible")("The temperature drops to -3 degrees.", "-3") == Verdict("-3", True)
    assert not get_grader("gsm8k_flexible")("The temperature drops to 3 degrees.", "-3").correct


def test_gsm8k_exact_match_is_a_string_match_so_18_00_is_not_18():
    # lm-eval's exact_match strips only `,`, `$` and one trailing `.`: "18.00" stays "18.00" != "18".
    assert get_grader("gsm8k_flexible")("The answer is 18.00", "18") == Verdict("18.00", False)
    assert get_grader("gsm8k_strict")("#### 18.00", "18") == Verdict("18.00", False)
    assert get_grader("gsm8k_flexible")("The answer is 18.", "18").correct
    # numeric_match compares decimals and accepts it
    assert get_grader("numeric_match")("The answer is 18.00", "18") == Verdict("18.00", True)


def test_gsm8k_full_solution_gold_is_reduced_to_its_final_answer():
    gold = (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    )
    for name in ("gsm8k_strict", "gsm8k_flexible", "numeric_match"):
        assert get_grader(name)("She makes $18 a day.\n#### 18", gold).correct
        assert not get_grader(name)("She makes $9 a day.\n#### 9", gold).correct


# ---- numeric_match, math_verify details ----


def test_numeric_match_is_exact():
    grade = get_grader("numeric_match")
    assert grade("The answer is 132.0", "132").correct
    assert not grade("The answer is 1322", "132").correct
    assert grade("no number here", "132") == Verdict(None, False)


def test_math_verify_works_outside_the_main_thread():
    # math-verify's signal-based timeouts raise outside the main thread unless disabled.
    results: list[Verdict] = []
    thread = threading.Thread(target=lambda: results.append(get_grader("math_verify")("$\\boxed{0.5}$", "\\frac12")))
    thread.start()
    thread.join()
    assert results == [Verdict("1/2", True)]


def test_math_verify_without_an_answer_extracts_nothing():
    assert get_grader("math_verify")("I give up", "3") == Verdict(None, False)


# ---- registry ----


def test_graders_registry_names():
    assert sorted(GRADERS) == [
        "boxed_strict",
        "dapo_strict",
        "gsm8k_flexible",
        "gsm8k_strict",
        "math_verify",
        "numeric_match",
    ]


def test_unknown_grader_suggests_the_closest_name():
    with pytest.raises(RecipeError, match=r"unknown grader 'gsm8k_strct' \(did you mean 'gsm8k_strict'\?\)"):
        get_grader("gsm8k_strct")
    with pytest.raises(
        RecipeError,
        match="unknown grader 'bleu'; valid: boxed_strict, dapo_strict, gsm8k_flexible, gsm8k_strict, math_verify, "
        "numeric_match",
    ):
        grade_batch("bleu", ["x"], ["y"])


def test_grade_batch_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        grade_batch("numeric_match", ["1", "2"], ["1"])


# ---- metrics ----


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every pair holds a correct sample


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_mean_stderr_uses_the_sample_standard_deviation():
    mean, stderr = mean_stderr([1, 0, 1, 0])
    assert mean == 0.5
    assert stderr == pytest.approx(math.sqrt(1 / 3) / 2)
    assert mean_stderr([0.25]) == (0.25, 0.0)


def test_majority_answer_skips_none_and_breaks_ties_by_first_occurrence():
    assert majority_answer(["3", None, "4", "4", None, None]) == "4"
    assert majority_answer(["4", "3", "3", "4"]) == "4"
    assert majority_answer(["3", "4"]) == "3"
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_aggregate_hand_example():
    correct = [[True, False, False], [False, False, False], [True, True, True]]
    answers = [["7", "5", "5"], [None, "1", None], ["9", "9", "9"]]
    golds = ["7", "2", "9"]
    out = aggregate(correct, answers, lambda i, a: a == golds[i], ks=(1, 2, 3, 4))
    rates = [1 / 3, 0.0, 1.0]
    assert out["accuracy"] == pytest.approx(sum(rates) / 3)
    assert out["accuracy_stderr"] == pytest.approx(mean_stderr(rates)[1])
    # pass@2 per prompt: 1 - C(2,2)/C(3,2) = 2/3, 0, 1
    assert out["pass@2"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert out["pass@3"] == pytest.approx((1 + 0 + 1) / 3)
    assert "pass@1" not in out and "pass@4" not in out  # k = 1 is accuracy; k > n cannot be estimated
    # majorities: "5" (wrong), "1" (wrong), "9" (right)
    assert out["maj@3"] == pytest.approx(1 / 3)


def test_aggregate_majority_without_a_gold_fn_reuses_the_sample_verdicts():
    correct = [[True, False, False], [False, False, False], [True, True, True], [False, True, True]]
    answers = [["7", "5", "5"], [None, "1", None], ["9", "9", "9"], ["3", "4", "4"]]
    assert aggregate(correct, answers)["maj@3"] == pytest.approx(2 / 4)  # "5" wrong, "1" wrong, "9", "4" right


def test_maj_at_n_with_real_graders_counts_a_majority_answer_the_grader_cannot_reread():
    # gsm8k_strict extracts "1234" from "#### 1,234", which graded again as a completion has no `#### `.
    completions = [["So 1,234.\n#### 1,234", "#### 1234", "#### 99"]]
    golds = ["1234"]
    verdicts = [grade_batch("gsm8k_strict", c, golds * 3) for c in completions]
    out = aggregate([[v.correct for v in vs] for vs in verdicts], [[v.extracted for v in vs] for vs in verdicts])
    assert out["maj@3"] == 1.0
    assert not get_grader("gsm8k_strict")("1234", "1234").correct


def test_aggregate_without_answers_has_no_majority_metric():
    out = aggregate([[True], [False]])
    assert out == {"accuracy": 0.5, "accuracy_stderr": pytest.approx(0.5)}


# ------------------------------------------------------------------ the marked final answer is the one graded

WORKED = (
    "The books cost 3 x $4.00 = $<<3*4=12.00>>12.00 and the pens $2.00 + $5.00 = $<<2+5=7.00>>7.00.\n"
    "In total she pays $12.00 + $7.00 = $<<12+7=19.00>>19.00.\n#### {final}"
)


@pytest.mark.parametrize("grader", ["math_verify"])
@pytest.mark.parametrize(
    ("completion", "gold", "right"),
    [(WORKED.format(final="19"), "19", True),
     (WORKED.format(final="19"), "12", False),  # an earlier number is not the answer
     (WORKED.format(final="12"), "12", True),
     (WORKED.format(final="12"), "19", False),  # a wrong final is wrong, though the right value is on a line above
     ("First 6 then 8.\n#### 1,234", "1234", True),
     ("So x = 7, then x + 1 = 8. The final answer is $\\frac{14}{3}$. I hope it is correct.", "14/3", True),
     ("So x = 7, then x + 1 = 8. The final answer is $\\frac{14}{3}$. I hope it is correct.", "8", False),
     ("Try \\boxed{5}; no, it is \\boxed{7}.", "7", True),
     ("Try \\boxed{5}; no, it is \\boxed{7}.", "5", False),
     ("\\boxed{\\frac{1}{\\sqrt{2}}} after 3 steps", "\\frac{\\sqrt{2}}{2}", True),
     ("The answer is 14/3.", "14/3", True),  # a plain fraction before a full stop is the fraction
     ("The answer is 14/3.", "\\frac{14}{3}", True),
     ("We get -3/4, so x = -3/4!", "-3/4", True),
     ("The answer is 14/3.", "4.667", False)],
)  # fmt: skip
def test_the_marked_final_answer_is_graded_not_an_earlier_number(grader, completion, gold, right):
    from reward_models.math import math_verify_reward

    assert get_grader(grader)(completion, gold).correct is right
    assert math_verify_reward([""], [completion], answer=[gold]) == [1.0 if right else 0.0]  # the reward agrees


def test_every_gsm8k_reference_solution_grades_right_by_its_marked_answer():
    """The 1,319 GSM8K test solutions end in `#### N`; read whole by math-verify, 4 were graded wrong (it took an
    earlier number, e.g. "$4.00 + $2.00 = $6.00 ... #### 6" as 4.00). Graded by the marked answer: none."""
    from math_verify import parse, verify

    from reward_models.math import parse_gold

    rows = _rows("gsm8k", "full")
    grade = get_grader("math_verify")
    wrong = [r["answer"][-80:] for r in rows if not grade(r["answer"], _gsm8k_gold(r)).correct]
    assert wrong == [] and len(rows) == 1319
    whole_text = sum(not verify(parse_gold(_gsm8k_gold(r)), parse(r["answer"])) for r in rows)
    assert whole_text > 0  # the failure mode this guards against is real on this data


@pytest.mark.parametrize(
    ("completion", "gold", "right"),
    [("... so the answer is $\\boxed{7}$.", "7", True),
     ("... so the answer is 7.", "7", False),  # no box: no credit (math_verify would accept it)
     ("\\boxed{7} is my first guess. " + "Checking again, step by step. " * 12, "7", False),  # box not in the tail
     ("First \\boxed{5}, but finally \\boxed{7}", "7", True),
     ("First \\boxed{7}, but finally \\boxed{5}", "7", False),
     ("\\boxed{\\frac{1}{2}}", "0.5", True)],
)  # fmt: skip
def test_boxed_strict_credits_only_a_final_box_and_is_lenient(completion, gold, right):
    from reward_models.math import boxed_strict_reward

    assert get_grader("boxed_strict")(completion, gold).correct is right
    assert boxed_strict_reward([""], [completion], answer=[gold]) == [1.0 if right else 0.0]
    assert get_grader("math_verify")(completion, gold).correct or not right  # strict never accepts what it rejects


# ------------------------------------------------------------------ what math-verify alone gets wrong (issue 27, 7)
# Each case is graded by both math-verify graders and the math_verify reward; boxed_strict sees only the box.


def _both(completion: str, gold: str) -> bool:
    from reward_models.math import boxed_strict_reward, math_verify_reward

    verdict = get_grader("math_verify")(completion, gold).correct
    assert math_verify_reward([""], [completion], answer=[gold]) == [1.0 if verdict else 0.0]
    if "\\boxed{" in completion:
        assert get_grader("boxed_strict")(completion, gold).correct is verdict
        assert boxed_strict_reward([""], [completion], answer=[gold]) == [1.0 if verdict else 0.0]
    return verdict


@pytest.mark.parametrize(
    ("completion", "gold", "right"),
    [("so $\\boxed{52_8}$", "52_8", True),
     ("so $\\boxed{52_{8}}$", "52_8", True),
     ("so $\\boxed{52_8}$", "52_{8}", True),
     ("so $\\boxed{1011_2}$", "1011_2", True),
     ("so $\\boxed{4210_5}$", "4210_{5}", True),
     ("so $\\boxed{52_9}$", "52_8", False),  # math-verify alone reads 52 and accepts it
     ("so $\\boxed{52_{9}}$", "52_{8}", False),
     ("so $\\boxed{52}$", "52_8", False),  # no subscript: read in base 10, which is not 52_8
     ("so $\\boxed{1011_{10}}$", "1011_2", False),
     ("so $\\boxed{53_8}$", "52_8", False),  # the digits still count
     ("so $\\boxed{52}$", "52_{10}", True),  # base 10 needs no subscript
     ("so $\\boxed{52_0}$", "52_{10}", False),
     ("In base 8, 42 is 5 * 8 + 2.\n#### 52_8", "52_8", True),
     ("In base 8, 42 is 5 * 8 + 2.\n#### 52", "52_8", False)],
)  # fmt: skip
def test_a_base_subscript_in_the_gold_must_be_matched(completion, gold, right):
    assert _both(completion, gold) is right


@pytest.mark.parametrize(
    ("completion", "gold", "right"),
    [("She has 72 left.\n#### 72\n\nQuestion: Tom has 5 apples. How many?\nAnswer: 5 apples.\n#### 5", "72", True),
     ("She has 72 left.\n#### 72\n\nQuestion: Tom has 5 apples. How many?\nAnswer: 5 apples.\n#### 5", "5", False),
     ("#### 5\n#### 72", "72", False)],
)  # fmt: skip
def test_the_first_hash_marker_wins(completion, gold, right):
    # as lm-eval's strict-match (group_select 0); a rollout without a stop string runs on into a made-up question
    assert _both(completion, gold) is right
    assert get_grader("gsm8k_strict")(completion, gold).correct is right  # the lm-eval reproduction agrees


@pytest.mark.parametrize(
    ("completion", "gold", "right"),
    [("#### 2 1/2", "5/2", True),
     ("#### 2 1/2", "2.5", True),
     ("#### 2 1/2", "\\frac{5}{2}", True),
     ("#### 2 1/2", "2", False),
     ("#### 2 1/2", "1/2", False),
     ("#### 2 1/2", "1", False),  # math-verify alone reads "2 1/2" as the product 2 * 1/2
     ("#### -3 1/4.", "-13/4", True),
     ("The final answer is $2 1/2$.", "5/2", True),
     ("so $\\boxed{2 1/2}$", "5/2", True),
     ("so $\\boxed{1\\frac{4}{5}}$", "1\\frac{4}{5}", True),  # LaTeX mixed numbers were right already (MATH-500)
     ("so $\\boxed{9/5}$", "1\\frac{4}{5}", True),
     ("so $\\boxed{137 \\frac{1}{2}}$", "137 \\frac{1}{2}", True)],
)  # fmt: skip
def test_a_plain_mixed_number_reads_as_its_value(completion, gold, right):
    assert _both(completion, gold) is right


@pytest.mark.parametrize(
    ("completion", "gold", "right"),
    [("so $\\boxed{25\\%}$", "25", True),
     ("so $\\boxed{25\\%}$", "25\\%", True),
     ("so $\\boxed{25\\%}$", "0.25", False),  # math-verify alone accepts both 25 and 0.25
     ("#### 25%", "25", True),
     ("#### 25%", "0.25", False),
     ("The rate rose by 25%.", "25", True),
     ("The rate rose by 25%.", "0.25", False),
     ("so $\\boxed{25}$", "25\\%", True),  # the other direction: a percent gold compares its number as written
     ("so $\\boxed{0.25}$", "25\\%", False),
     ("so $\\boxed{0.25}$", "25", False)],
)  # fmt: skip
def test_a_percentage_compares_as_the_number_written(completion, gold, right):
    assert _both(completion, gold) is right


def test_every_registered_grader_is_accepted_by_suites_and_recipes():
    from posttrain.evaluation.suite import GRADER_NAMES

    assert set(GRADER_NAMES) == set(GRADERS)  # one list: a new grader needs no second edit
