"""Benchmark evaluation: suites of benchmarks run through any rollout backend, graded, stored, reported."""

from posttrain.evaluation.benchmarks import Benchmark, recipe_benchmarks
from posttrain.evaluation.runner import EvalResult, evaluate, evaluate_preference

__all__ = ["Benchmark", "EvalResult", "evaluate", "evaluate_preference", "recipe_benchmarks"]
