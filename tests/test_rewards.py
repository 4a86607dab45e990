"""Built-in rewards, user rewards by `module:function`, and errors that name the function and sample."""

import threading

import pytest

from posttrain.errors import RewardError
from reward_models import build_rewards, guarded, resolve_reward, reward_names
from reward_models.format import format_reward
from reward_models.math import extract_last_number, math_verify_reward, numeric_match_reward


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [("132", "132", 1.0), ("1322", "132", 0.0), ("132.0", "132", 1.0), ("The sum is 132.", "132", 1.0),
     ("1,320", "1320", 1.0), ("$18", "18", 1.0), ("-7", "7", 0.0), ("no number", "3", 0.0), ("13 2", "132", 0.0)],
)  # fmt: skip
def test_numeric_match_is_exact(completion, gold, expected):
    assert numeric_match_reward(["p"], [completion], answer=[gold]) == [expected]


def test_extract_last_number():
    assert extract_last_number("first 12, then $1,000.") == "1000"
    assert extract_last_number("nothing") is None


# GSM8K test rows 1-5 (openai/grade-school-math, MIT): gold answers after '####'.
GSM8K_GOLD = ["18", "3", "70000", "540", "20"]
# MATH-500 answers (openai/prm800k test split, MIT).
MATH500_GOLD = [r"\left( 3, \frac{\pi}{2} \right)", "p - q", r"\frac{14}{3}", "9", r"\text{Evelyn}"]


def test_math_verify_grades_gsm8k_answers():
    right = [f"Let me compute. The answer is {g}." for g in GSM8K_GOLD]
    wrong = [f"Let me compute. The answer is {int(g) + 1}." for g in GSM8K_GOLD]
    assert math_verify_reward(["q"] * 5, right, answer=GSM8K_GOLD) == [1.0] * 5
    assert math_verify_reward(["q"] * 5, wrong, answer=GSM8K_GOLD) == [0.0] * 5


def test_math_verify_grades_boxed_math500_answers():
    right = [f"So the final answer is $\\boxed{{{g}}}$." for g in MATH500_GOLD]
    assert math_verify_reward(["q"] * 5, right, answer=MATH500_GOLD) == [1.0] * 5
    wrong = [r"$\boxed{\left( 3, \frac{\pi}{3} \right)}$", r"$\boxed{p + q}$", r"$\boxed{\frac{13}{3}}$",
             r"$\boxed{8}$", r"$\boxed{\text{Bob}}$"]  # fmt: skip
    assert math_verify_reward(["q"] * 5, wrong, answer=MATH500_GOLD) == [0.0] * 5


def test_math_verify_works_off_the_main_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=math_verify_reward(["q"], ["= 18"], answer=["18"])))
    thread.start()
    thread.join(60)
    assert out["r"] == [1.0]


def test_conversational_completions_are_read():
    completion = [{"role": "assistant", "content": "it is 42"}]
    assert numeric_match_reward(["q"], [completion], answer=["42"]) == [1.0]


def test_format_reward():
    good, bad = "<think>hmm</think> <answer>4</answer>", "<answer>4</answer>"
    assert format_reward(["p", "p"], [good, bad]) == [1.0, 0.0]


def test_missing_answer_column_is_explained():
    with pytest.raises(RewardError, match="needs an 'answer' column"):
        numeric_match_reward(["p"], ["1"])


def test_unknown_name_suggests_nearest():
    with pytest.raises(RewardError, match=r"unknown reward 'numric_match' \(did you mean 'numeric_match'\?\)"):
        resolve_reward("numric_match")
    assert {"numeric_match", "math_verify", "format"} <= set(reward_names())


def test_user_reward_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "user_rw.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("user_rw:length")(["p"], ["abc"]) == [3]
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod'"):
        resolve_reward("no_such_mod:f")
    with pytest.raises(RewardError, match="has no callable 'missing'"):
        resolve_reward("user_rw:missing")


def test_guarded_names_function_and_offending_sample():
    def picky(prompts, completions, **kwargs):
        return [1.0 / (0 if c == "boom" else 1) for c in completions]

    reward = guarded(picky, "my:picky")
    with pytest.raises(RewardError) as err:
        reward(prompts=["a", "b", "c"], completions=["x", "y", "boom"], answer=["1", "2", "3"])
    msg = str(err.value)
    assert "my:picky" in msg and "ZeroDivisionError" in msg and "sample 2" in msg and "'boom'" in msg
    assert "answer: '3'" in msg
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    assert reward.__name__ == "my:picky"


def test_guarded_checks_length_and_nan():
    with pytest.raises(RewardError, match="returned 1 scores for 2 completions"):
        guarded(lambda prompts, completions, **kw: [1.0], "short")(prompts=["a", "b"], completions=["x", "y"])
    with pytest.raises(RewardError, match="returned NaN for sample 1"):
        guarded(lambda prompts, completions, **kw: [1.0, float("nan")], "nan")(
            prompts=["a", "b"], completions=["x", "y"]
        )
    none_ok = guarded(lambda prompts, completions, **kw: [None, 2], "n")(prompts=["a", "b"], completions=["x", "y"])
    assert none_ok == [None, 2.0]


def test_build_rewards_binds_kwargs_and_weights():
    funcs, weights = build_rewards(
        [{"name": "numeric_match"}, {"name": "format", "weight": 0.5, "kwargs": {"pattern": "a+"}}]
    )
    assert weights == [1.0, 0.5]
    assert [f.__name__ for f in funcs] == ["numeric_match", "format"]
    assert funcs[1](prompts=["p", "p"], completions=["aaa", "b"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"rewards\[0\]: missing 'name'"):
        build_rewards([{"weight": 1}])
    with pytest.raises(RewardError, match=r"rewards\[0\] \(format\): 'weight' must be a number"):
        build_rewards([{"name": "format", "weight": "high"}])
