"""Benchmark evaluation: a `Benchmark` (rows + grader + generation settings) run through any rollout backend."""

from posttrain.evaluation.runner import Benchmark, EvalResult, evaluate, heldout_benchmark

__all__ = ["Benchmark", "EvalResult", "evaluate", "heldout_benchmark"]
