"""Benchmark evaluation: suites of benchmarks run through any rollout backend, graded, stored, reported."""

from posttrain.evaluation.runner import Benchmark, EvalResult, evaluate, evaluate_preference, recipe_benchmarks

__all__ = ["Benchmark", "EvalResult", "evaluate", "evaluate_preference", "recipe_benchmarks"]
