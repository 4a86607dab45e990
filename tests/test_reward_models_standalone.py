"""`reward_models` stands on its own: it imports nothing from posttrain, and posttrain's math grader and the
math rewards decide "is this answer right" with the same code (`reward_models.math.check_math_answer`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.errors import DataError
from posttrain.evaluation.graders import Verdict, get_grader, grade_batch
from reward_models.errors import RewardError, UserError
from reward_models.math import check_math_answer, is_math_correct, math_verify_reward

ROOT = Path(__file__).resolve().parents[1]

# Every submodule, imported one by one with posttrain made unimportable; then the lazily imported code paths
# (the saturation scorer, the math reward, a name suggestion) run, since an import inside a function counts too.
STANDALONE = textwrap.dedent(
    """
    import importlib
    import importlib.util
    import pkgutil
    import sys


    class NoPosttrain:
        def find_spec(self, name, path=None, target=None):
            if name == "posttrain" or name.startswith("posttrain."):
                raise ImportError(f"reward_models imported {name!r}")
            return None


    sys.meta_path.insert(0, NoPosttrain())

    import reward_models

    expected = {"code_exec", "errors", "format", "image", "math", "polar", "registry", "remote", "sandbox",
                "sandbox_process", "scoring", "sequence_classifier", "server"}
    found = {m.name for m in pkgutil.iter_modules(reward_models.__path__)} - {"__main__"}
    missing = expected - found
    assert not missing, f"submodules gone: {sorted(missing)}"
    has_starlette = importlib.util.find_spec("starlette") is not None
    imported = []
    for name in sorted(found | {"__main__"}):
        if name == "server" and not has_starlette:
            continue
        importlib.import_module(f"reward_models.{name}")
        imported.append(name)

    import torch

    from reward_models.image import image_scorer
    from reward_models.math import math_verify_reward
    from reward_models.registry import RewardError, resolve_reward

    red = torch.full((1, 3, 8, 8), -1.0)
    red[:, 0] = 1.0
    assert image_scorer("saturation").score(red, ["red"]) == [1.0]
    assert math_verify_reward(["q"], ["$\\\\boxed{2}$"], answer=["2"]) == [1.0]
    try:
        resolve_reward("numric_match")
    except RewardError as err:
        assert "did you mean 'numeric_match'" in str(err), err
    else:
        raise AssertionError("an unknown reward resolved")

    leaked = sorted(m for m in sys.modules if m == "posttrain" or m.startswith("posttrain."))
    assert not leaked, leaked
    print("imported:", " ".join(imported))
    """
)


def test_reward_models_imports_and_runs_without_posttrain():
    result = subprocess.run([sys.executable, "-c", STANDALONE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = result.stdout.split("imported:", 1)[1].split()
    for name in ("math", "format", "polar", "image", "registry", "remote", "sequence_classifier", "scoring"):
        assert name in imported


def test_the_standalone_check_catches_a_posttrain_import(tmp_path):
    # The finder really blocks: a module that imports posttrain fails under it.
    (tmp_path / "leaky.py").write_text("import posttrain.errors\n")
    code = STANDALONE.split("import reward_models\n", 1)[0] + "import leaky\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode != 0 and "reward_models imported 'posttrain'" in result.stderr


# (completion, gold, expected verdict): equivalent forms, a MATH-500-style tuple, a wrong value, no answer at all.
CASES = [
    ("The answer is $\\boxed{0.5}$.", "\\frac12", True),
    ("So $x = \\boxed{\\frac{14}{3}}$", "\\frac{14}{3}", True),
    ("Therefore the result is $\\boxed{p - q}$.", "p - q", True),
    ("In polar form: $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("The total is 70000 dollars.", "70000", True),
    ("The answer is $\\boxed{13}$.", "12", False),
    ("So $x = \\boxed{\\frac{14}{5}}$", "\\frac{14}{3}", False),
    ("I give up.", "3", False),
]


@pytest.mark.parametrize(("completion", "gold", "correct"), CASES)
def test_grader_and_reward_give_the_same_verdict(completion, gold, correct):
    verdict = get_grader("math_verify")(completion, gold)
    assert verdict.correct is correct
    assert math_verify_reward(["q"], [completion], answer=[gold]) == [1.0 if correct else 0.0]
    assert is_math_correct(completion, gold) is correct
    assert check_math_answer(completion, gold) == (verdict.extracted, verdict.correct)


def test_grader_and_reward_agree_on_a_batch_and_on_what_was_extracted():
    completions, golds, expected = zip(*CASES)
    verdicts = grade_batch("math_verify", list(completions), list(golds))
    assert [v.correct for v in verdicts] == list(expected)
    assert math_verify_reward(["q"] * len(CASES), list(completions), answer=list(golds)) == [
        1.0 if c else 0.0 for c in expected
    ]
    assert verdicts[0] == Verdict("1/2", True)
    assert verdicts[5] == Verdict("13", False)
    assert verdicts[-1] == Verdict(None, False)


def test_an_unparsable_gold_is_a_user_error_for_both():
    with pytest.raises(DataError, match="grader 'math_verify': cannot parse the gold answer ''"):
        get_grader("math_verify")("$\\boxed{1}$", "")
    with pytest.raises(RewardError, match="reward 'math_verify': math-verify cannot parse the gold answer ''"):
        math_verify_reward(["q"], ["$\\boxed{1}$"], answer=[""])
    assert issubclass(DataError, UserError)
