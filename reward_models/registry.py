"""Reward functions by name: built-ins registered here, user code as `package.module:function`.

Every reward follows TRL's convention `f(prompts, completions, **columns) -> list[float | None]`. `guarded` wraps
one so that a failure names the function and the sample it failed on instead of surfacing as a bare traceback
from inside the trainer (or, worse, as a silent zero).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.errors import RewardError

_BUILTINS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    def wrap(func: Callable) -> Callable:
        _BUILTINS[name] = func
        return func

    return wrap


def reward_names() -> list[str]:
    return sorted(_BUILTINS)


def resolve_reward(name: str) -> Callable:
    """A built-in reward by name, or user code given as `package.module:function`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RewardError(f"reward '{name}': cannot import module '{module_name}' ({err})") from err
        func = getattr(module, attr, None)
        if func is None or not callable(func):
            raise RewardError(f"reward '{name}': module '{module_name}' has no callable '{attr}'")
        return func
    if name not in _BUILTINS:
        close = difflib.get_close_matches(name, _BUILTINS, n=1)
        hint = f" (did you mean '{close[0]}'?" + ")" if close else ""
        raise RewardError(f"unknown reward '{name}'{hint}; built-in rewards: {', '.join(reward_names())}")
    return _BUILTINS[name]


def text_of(item: Any) -> str:
    """A prompt or completion as text: strings as-is, TRL's conversational form as its last message's content."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    return str(item)


def _short(value: Any, limit: int = 200) -> str:
    text = text_of(value)
    return text if len(text) <= limit else text[:limit] + "…"


def guarded(func: Callable, name: str) -> Callable:
    """Wrap a reward so errors name it and the offending sample; results are checked (length, NaN)."""

    @functools.wraps(func)
    def wrapper(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float | None]:
        try:
            scores = func(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as err:
            index = _first_failing_index(func, prompts, completions, kwargs)
            raise RewardError(_describe_failure(name, err, index, prompts, completions, kwargs)) from err
        return _check(name, scores, len(completions), prompts, completions)

    wrapper.__name__ = name  # TRL logs each reward under its function's __name__
    return wrapper


def _first_failing_index(func: Callable, prompts: Sequence, completions: Sequence, kwargs: dict) -> int | None:
    # Error path only: re-score one sample at a time to point at the one that breaks.
    n = len(completions)
    for i in range(n):
        one = {k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
        try:
            func(prompts=[prompts[i]], completions=[completions[i]], **one)
        except Exception:
            return i
    return None


def _describe_failure(name: str, err: Exception, index: int | None, prompts, completions, kwargs) -> str:
    head = f"reward '{name}' raised {type(err).__name__}: {err}"
    if index is None:
        return head + " (on the batch; no single sample fails alone)"
    answer = kwargs.get("answer")
    lines = [head, f"  on sample {index}:", f"    prompt: {_short(prompts[index])!r}",
             f"    completion: {_short(completions[index])!r}"]  # fmt: skip
    if isinstance(answer, list) and index < len(answer):
        lines.append(f"    answer: {_short(answer[index])!r}")
    return "\n".join(lines)


def _check(name: str, scores: Any, expected: int, prompts, completions) -> list[float | None]:
    if not isinstance(scores, Sequence) or isinstance(scores, (str, bytes)):
        raise RewardError(f"reward '{name}' returned {type(scores).__name__}; expected a list of {expected} floats")
    if len(scores) != expected:
        raise RewardError(f"reward '{name}' returned {len(scores)} scores for {expected} completions")
    out: list[float | None] = []
    for i, score in enumerate(scores):
        if score is None:
            out.append(None)
            continue
        try:
            value = float(score)
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward '{name}' returned {score!r} for sample {i}; expected a number") from err
        if math.isnan(value):
            raise RewardError(
                f"reward '{name}' returned NaN for sample {i} (completion {_short(completions[i])!r}); "
                "return None to skip a sample"
            )
        out.append(value)
    return out


def build_rewards(specs: list[dict[str, Any]]) -> tuple[list[Callable], list[float]]:
    """Guarded reward functions (kwargs bound) and their weights from `[{name, weight, kwargs}, ...]`."""
    funcs, weights = [], []
    for i, spec in enumerate(specs):
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise RewardError(f"rewards[{i}]: missing 'name'")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RewardError(f"rewards[{i}] ({name}): 'weight' must be a number, got {weight!r}")
        bound = spec.get("kwargs") or {}
        if not isinstance(bound, dict):
            raise RewardError(f"rewards[{i}] ({name}): 'kwargs' must be a mapping")
        func = resolve_reward(name)
        if bound:
            func = functools.partial(func, **bound)
        funcs.append(guarded(func, name))
        weights.append(float(weight))
    return funcs, weights
