"""Benchmark metrics from per-sample correctness: accuracy with its standard error, avg@k, pass@k, majority vote."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean: sample standard deviation (ddof=1) / sqrt(n); 0.0 for a single value.

    The same estimator as lm-evaluation-harness (`lm_eval/api/metrics.py: mean_stderr`), so the error bars compare.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_stderr of an empty list")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement
    include a correct one.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the paper's numerically stable form: the binomials overflow
    floats for n in the hundreds.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(per_prompt_correct: list[list[bool]], k: int) -> dict[str, float]:
    """avg@k with its standard error: `k` samples per prompt, the mean over prompts of (correct samples / k), and the
    standard error over prompts of that per-prompt share (`mean_stderr`: sample std / sqrt(prompts)).

    The metric the NFT and DAPO papers report for AIME and AMC (avg@32): the official validation averages each
    prompt's 32 verdicts, then the prompts (NVlabs/NFT ray_nft_trainer.py `_validate`, `mean@{n}` per prompt). It
    is `accuracy` when n = k; a prompt with another number of samples is an error rather than a silently
    different estimate.
    """
    if k < 1:
        raise ValueError(f"avg_at_k: k must be >= 1, got {k}")
    if not per_prompt_correct:
        raise ValueError("avg_at_k: no prompts")
    sizes = sorted({len(c) for c in per_prompt_correct})
    if sizes != [k]:
        raise ValueError(f"avg_at_k: avg@{k} needs exactly {k} samples per prompt, got {sizes}")
    mean, stderr = mean_stderr([sum(c) / k for c in per_prompt_correct])
    return {f"avg@{k}": mean, f"avg@{k}_stderr": stderr}


def majority_answer(answers: list[str | None]) -> str | None:
    """The most common answer, ignoring None (nothing extracted); ties go to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    # Counter keeps insertion order and max() returns the first maximum, hence first occurrence wins ties.
    return max(counts, key=counts.__getitem__)


def aggregate(
    per_prompt_correct: list[list[bool]],
    per_prompt_answers: list[list[str | None]] | None = None,
    gold_correct_fn: Callable[[int, str | None], bool] | None = None,
    ks: tuple[int, ...] = (1,),
) -> dict[str, float]:
    """Benchmark metrics from the correctness of `n` samples for each of `P` prompts.

    - `accuracy`: pass@1 estimated from all samples, mean over prompts of (correct samples / n). With n = 1 it is
      plain accuracy; with n > 1 it has lower variance than grading one sample per prompt.
    - `accuracy_stderr`: standard error over prompts of that per-prompt fraction (`mean_stderr`).
    - `pass@k` for each k in `ks` with 1 < k <= n: mean over prompts of the unbiased `pass_at_k(n, c, k)`.
      k = 1 is `accuracy`; k > n cannot be estimated and is left out.
    - `maj@n` when `per_prompt_answers` is given: share of prompts whose majority answer (`majority_answer`) is
      correct; a prompt with no extracted answer counts as wrong. Correct means `gold_correct_fn(prompt_index,
      answer)` when given, else the verdict of the samples that gave that answer (graders are deterministic, so
      samples with the same extracted answer share a verdict; this needs no re-grading, which an extracted answer
      does not always survive: `gsm8k_strict` needs `#### `, math-verify cannot re-read sympy's printout).
    """
    if not per_prompt_correct:
        raise ValueError("aggregate: no prompts")
    sizes = {len(c) for c in per_prompt_correct}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"aggregate: every prompt needs the same number (>= 1) of samples, got {sorted(sizes)}")
    n = sizes.pop()

    rates = [sum(c) / n for c in per_prompt_correct]
    accuracy, stderr = mean_stderr(rates)
    out = {"accuracy": accuracy, "accuracy_stderr": stderr}
    for k in sorted(set(ks)):
        if 1 < k <= n:
            out[f"pass@{k}"] = math.fsum(pass_at_k(n, sum(c), k) for c in per_prompt_correct) / len(rates)

    if per_prompt_answers is not None:
        if len(per_prompt_answers) != len(per_prompt_correct) or any(len(a) != n for a in per_prompt_answers):
            raise ValueError("aggregate: per_prompt_answers must have the shape of per_prompt_correct")
        hits = 0
        for i, (answers, correct) in enumerate(zip(per_prompt_answers, per_prompt_correct)):
            majority = majority_answer(answers)
            if majority is None:
                continue
            if gold_correct_fn is not None:
                hits += bool(gold_correct_fn(i, majority))
            else:
                hits += correct[answers.index(majority)]
        out[f"maj@{n}"] = hits / len(per_prompt_answers)
    return out


def preference_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Pairwise metrics of a reward model's scores on (chosen, rejected) pairs: the one implementation the reward and
    POLAR trainers and the preference/polar benchmarks share.

    accuracy: share of pairs with chosen > rejected (ties count as wrong), with its standard error; margin: mean
    chosen - rejected; loss: mean Bradley-Terry loss -log sigmoid(margin); and the mean scores.
    """
    n = len(chosen)
    if n == 0 or n != len(rejected):
        raise ValueError(f"preference_metrics: {n} chosen but {len(rejected)} rejected scores")
    margins = [c - r for c, r in zip(chosen, rejected)]
    accuracy, stderr = mean_stderr([1.0 if m > 0 else 0.0 for m in margins])
    # -log sigmoid(m) = log(1 + e^-m), computed without overflow for large |m|.
    losses = [max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins]
    return {
        "accuracy": accuracy,
        "accuracy_stderr": stderr,
        "margin": math.fsum(margins) / n,
        "loss": math.fsum(losses) / n,
        "chosen_score": math.fsum(chosen) / n,
        "rejected_score": math.fsum(rejected) / n,
    }
