"""Built-in rewards, user rewards by `module:function`, and errors that name the function and sample."""

import asyncio
import pickle
import subprocess
import sys
import threading

import pytest

from posttrain.errors import RewardError
from reward_models import build_rewards, guarded, resolve_reward, reward_names
from reward_models.format import format_reward
from reward_models.math import extract_last_number, math_verify_reward, numeric_match_reward


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [("132", "132", 1.0), ("1322", "132", 0.0), ("132.0", "132", 1.0), ("The sum is 132.", "132", 1.0),
     ("132\n\n", "132", 1.0), ("132<|endoftext|>", "132", 1.0), ("1,320", "1320", 1.0), ("1,320", "132", 0.0),
     ("$18", "18", 1.0), ("$18.00", "18", 1.0), ("-7", "7", 0.0), ("no number", "3", 0.0), ("13 2", "132", 0.0),
     ("12.5", "12.50", 1.0), ("12.5", "125", 0.0)],
)  # fmt: skip
def test_numeric_match_is_exact(completion, gold, expected):
    assert numeric_match_reward(["p"], [completion], answer=[gold]) == [expected]


def test_extract_last_number():
    assert extract_last_number("first 12, then $1,000.") == "1000"
    assert extract_last_number("it is -3.5 degrees") == "-3.5"
    assert extract_last_number("nothing") is None


def test_numeric_match_refuses_a_gold_answer_without_a_number():
    # Scoring every completion 0.0 against an unusable gold would look like a model that never learns.
    with pytest.raises(RewardError, match="gold answer 'Evelyn' has no number"):
        numeric_match_reward(["p"], ["42"], answer=["Evelyn"])


def test_missing_or_misaligned_answer_column_is_explained():
    with pytest.raises(RewardError, match="needs an 'answer' column"):
        numeric_match_reward(["p"], ["1"])
    with pytest.raises(RewardError, match="needs an 'answer' column"):
        math_verify_reward(["p"], ["1"])
    with pytest.raises(RewardError, match="got 1 answers for 2 completions"):
        numeric_match_reward(["p", "p"], ["1", "2"], answer=["1"])


# GSM8K test rows 1-10 and 147 (openai/grade-school-math, MIT): the gold after '####'.
GSM8K_GOLD = ["18", "3", "70000", "540", "20", "64", "260", "160", "45", "460", "2,125"]
# MATH-500 answers, rows 1-12 (openai/prm800k test split, MIT), with a wrong variant of each.
MATH500 = [
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{3} \right)"),
    ("p - q", "p + q"),
    (r"\frac{14}{3}", r"\frac{13}{3}"),
    ("9", "8"),
    (r"\text{Evelyn}", r"\text{Bob}"),
    ("42", "24"),
    (r"90^\circ", r"45^\circ"),
    (r"3\sqrt{13}", r"3\sqrt{12}"),
    ("2220", "2202"),
    (r"\frac{3}{56}", r"\frac{3}{65}"),
]


def test_math_verify_grades_gsm8k_answers():
    n = len(GSM8K_GOLD)
    right = [f"Let me compute. The answer is {g}." for g in GSM8K_GOLD]
    wrong = [f"Let me compute. The answer is {int(g.replace(',', '')) + 1}." for g in GSM8K_GOLD]
    assert math_verify_reward(["q"] * n, right, answer=GSM8K_GOLD) == [1.0] * n
    assert math_verify_reward(["q"] * n, wrong, answer=GSM8K_GOLD) == [0.0] * n


def test_math_verify_grades_boxed_math500_answers():
    golds = [gold for gold, _ in MATH500]
    right = [f"... so the answer is $\\boxed{{{gold}}}$" for gold in golds]
    wrong = [f"... so the answer is $\\boxed{{{bad}}}$" for _, bad in MATH500]
    assert math_verify_reward(["q"] * len(golds), right, answer=golds) == [1.0] * len(golds)
    assert math_verify_reward(["q"] * len(golds), wrong, answer=golds) == [0.0] * len(golds)


def test_math_verify_accepts_equivalent_forms():
    completions = [r"$\boxed{\frac{28}{6}}$", r"$\boxed{-q + p}$", "The answer is 70,000."]
    assert math_verify_reward(["q"] * 3, completions, answer=[r"\frac{14}{3}", "p - q", "70000"]) == [1.0] * 3


def test_math_verify_works_off_the_main_thread():
    # TRL and eval harnesses may score from worker threads, where math-verify's SIGALRM timeouts raise.
    out: dict = {}

    def score():
        try:
            out["r"] = math_verify_reward(
                ["q", "q"], ["= 18", r"$\boxed{\frac{3}{65}}$"], answer=["18", r"\frac{3}{56}"]
            )
        except Exception as err:  # surfaced below: an exception in a thread would otherwise only be printed
            out["err"] = err

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(60)
    assert "err" not in out, out.get("err")
    assert out["r"] == [1.0, 0.0]


def test_conversational_prompts_and_completions_are_read():
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "6*7?"}]
    completion = [{"role": "assistant", "content": "it is 42"}]
    assert numeric_match_reward([prompt], [completion], answer=["42"]) == [1.0]
    assert math_verify_reward([prompt], [completion], answer=["42"]) == [1.0]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "<think>x</think><answer>4</answer>"}]}]
    assert format_reward([prompt], [parts]) == [1.0]


def test_format_reward():
    good, bad = "<think>hmm\n</think> <answer>4</answer>\n", "<answer>4</answer>"
    assert format_reward(["p", "p"], [good, bad]) == [1.0, 0.0]
    assert format_reward(["p"], ["ab"], pattern="a") == [0.0]  # the whole completion must match
    with pytest.raises(RewardError, match="invalid pattern"):
        format_reward(["p"], ["a"], pattern="(")


def test_builtins_are_registered_on_import():
    assert {"numeric_match", "math_verify", "boxed_strict", "dapo_strict", "format"} <= set(reward_names())
    assert resolve_reward("numeric_match") is numeric_match_reward


def test_dapo_strict_reward_scores_plus_minus_one_and_reads_the_answer_column():
    from reward_models import reward_columns
    from reward_models.math import dapo_strict_reward

    assert reward_columns("dapo_strict", {}) == ("answer",)
    completions = ["so $\\boxed{12}$", "so $\\boxed{12.0}$", "so 12", "\\boxed{12}" + "." * 91]
    assert dapo_strict_reward(["q"] * 4, completions, answer=["12"] * 4) == [1.0, -1.0, -1.0, -1.0]
    (func,), _ = build_rewards([{"name": "dapo_strict"}])
    assert func(prompts=["q", "q"], completions=["\\boxed{7}", "\\boxed{8}"], answer=["7", "7"]) == [1.0, -1.0]


def test_math_verify_reward_base_subscripts_mixed_numbers_percentages_and_the_first_hashes():
    completions = [r"$\boxed{52_9}$", r"$\boxed{52_8}$", "#### 2 1/2", "#### 2 1/2", r"$\boxed{25\%}$",
                   r"$\boxed{25\%}$", "#### 18\nQuestion: next one?\n#### 4"]  # fmt: skip
    golds = ["52_8", "52_8", "5/2", "1", "25", "0.25", "18"]
    assert math_verify_reward(["q"] * 7, completions, answer=golds) == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_unknown_name_suggests_nearest():
    with pytest.raises(RewardError, match=r"unknown reward 'numric_match' \(did you mean 'numeric_match'\? built-in"):
        resolve_reward("numric_match")
    with pytest.raises(RewardError, match=r"unknown reward 'zzz' \(built-in rewards: .*numeric_match"):
        resolve_reward("zzz")


def test_user_reward_by_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_rw"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
    )
    (pkg / "broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("userpkg_rw.scores:length")(["p"], ["abc"]) == [3]
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod'"):
        resolve_reward("no_such_mod:f")
    # The module exists but its own import fails: both names appear.
    with pytest.raises(RewardError, match="cannot import module 'userpkg_rw.broken'.*no_such_dependency_xyz"):
        resolve_reward("userpkg_rw.broken:f")
    with pytest.raises(RewardError, match="has no callable 'missing'"):
        resolve_reward("userpkg_rw.scores:missing")
    with pytest.raises(RewardError, match="has no callable '__doc__'"):
        resolve_reward("userpkg_rw.scores:__doc__")


def _picky(prompts, completions, **kwargs):
    return [1.0 / (0 if c == "boom" else 1) for c in completions]


def test_guarded_names_function_and_offending_sample():
    reward = guarded(_picky, "my:picky")
    with pytest.raises(RewardError) as err:
        reward(prompts=["a", "b", "c"], completions=["x", "y", "boom"], answer=["1", "2", "3"], trainer_state=object())
    msg = str(err.value)
    assert "my:picky" in msg and "ZeroDivisionError" in msg and "sample 2" in msg and "'boom'" in msg
    assert "prompt: 'c'" in msg and "answer: '3'" in msg
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    assert reward.__name__ == "my:picky"  # TRL logs rewards under __name__
    assert reward(prompts=["a"], completions=["x"], completion_ids=[[1]]) == [1.0]


def test_guarded_truncates_long_samples():
    with pytest.raises(RewardError) as err:
        guarded(_picky, "picky")(prompts=["p" * 5000], completions=["boom"])
    assert "p" * 200 + "…" in str(err.value) and "p" * 201 not in str(err.value)


def test_guarded_reward_pickles_and_keeps_working():
    reward = pickle.loads(pickle.dumps(guarded(_picky, "picky")))
    assert reward.__name__ == "picky" and reward(prompts=["a"], completions=["x"]) == [1.0]


def test_guarded_async_reward_stays_async():
    async def slow(prompts, completions, **kwargs):
        return [0.5 if c != "boom" else 1 / 0 for c in completions]

    reward = guarded(slow, "slow")
    assert asyncio.iscoroutinefunction(reward.__call__)  # how TRL decides to await it
    assert asyncio.run(reward(prompts=["a"], completions=["x"])) == [0.5]
    with pytest.raises(RewardError, match="sample 1"):
        asyncio.run(reward(prompts=["a", "b"], completions=["x", "boom"]))


def test_guarded_checks_length_type_and_non_finite():
    def returning(value):
        return guarded(lambda prompts, completions, **kw: value, "r")

    with pytest.raises(RewardError, match="reward 'r' returned 1 scores for 2 completions"):
        returning([1.0])(prompts=["a", "b"], completions=["x", "y"])
    with pytest.raises(RewardError, match="returned float; expected a list of 2 floats"):
        returning(1.0)(prompts=["a", "b"], completions=["x", "y"])
    with pytest.raises(RewardError, match="returned nan for sample 1 .*'y'"):
        returning([1.0, float("nan")])(prompts=["a", "b"], completions=["x", "y"])
    with pytest.raises(RewardError, match="returned inf for sample 0"):
        returning([float("inf"), 1.0])(prompts=["a", "b"], completions=["x", "y"])
    with pytest.raises(RewardError, match="returned 'high' for sample 0; expected a number"):
        returning(["high", 1.0])(prompts=["a", "b"], completions=["x", "y"])
    assert returning((None, 2))(prompts=["a", "b"], completions=["x", "y"]) == [None, 2.0]


def test_build_rewards_binds_kwargs_and_weights():
    funcs, weights = build_rewards(
        [{"name": "numeric_match"}, {"name": "format", "weight": 0.5, "kwargs": {"pattern": "a+"}}]
    )
    assert weights == [1.0, 0.5]
    assert [f.__name__ for f in funcs] == ["numeric_match", "format"]
    assert funcs[0](prompts=["p", "p"], completions=["7", "8"], answer=["7", "7"]) == [1.0, 0.0]
    assert funcs[1](prompts=["p", "p"], completions=["aaa", "b"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("specs", "pattern"),
    [([{"weight": 1}], r"rewards\[0\]: missing 'name'"),
     ([{"name": "format"}, {"name": "format", "weight": "high"}], r"rewards\[1\] \(format\): 'weight' must be a number"),
     ([{"name": "format", "weigth": 2}], r"rewards\[0\]: unknown key 'weigth' \(did you mean 'weight'\?\)"),
     ([{"name": "format", "kwargs": ["a+"]}], r"rewards\[0\] \(format\): 'kwargs' must be a mapping"),
     ([{"name": "numric_match"}], r"rewards\[0\]: unknown reward 'numric_match' \(did you mean 'numeric_match'"),
     ([{"name": "format", "kwargs": {"patern": "a"}}], r"unknown option 'patern' in reward 'format' \(did you mean 'pattern'\?\); valid: pattern"),
     (["format"], r"rewards\[0\]: expected a mapping")],
)  # fmt: skip
def test_build_rewards_spec_errors_name_the_entry(specs, pattern):
    with pytest.raises(RewardError, match=pattern):
        build_rewards(specs)


def test_bound_kwarg_that_is_also_a_column_is_refused():
    (func,), _ = build_rewards([{"name": "format", "kwargs": {"pattern": "a+"}}])
    with pytest.raises(RewardError, match=r"kwargs \['pattern'\] set in the recipe are also dataset columns"):
        func(prompts=["p"], completions=["a"], pattern=["b+"])


def test_importing_reward_models_stays_light():
    # Rewards are resolved while validating recipes and listing rewards, which must not pay for torch or trl.
    code = "import sys, reward_models; print(sorted(m for m in ('torch', 'trl', 'transformers', 'math_verify') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
