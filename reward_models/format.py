"""Format rewards: does the completion follow the requested layout?"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from reward_models.errors import RewardError
from reward_models.registry import register, text_of

THINK_ANSWER = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


@cache
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise RewardError(f"reward 'format': invalid pattern {pattern!r} ({err})") from err


@register("format")
def format_reward(prompts: list, completions: list, pattern: str = THINK_ANSWER, **kwargs: Any) -> list[float]:
    """1.0 when the whole completion matches `pattern` (default: <think>…</think> <answer>…</answer>)."""
    regex = _compile(pattern)
    # Surrounding whitespace (a trailing newline before EOS) is not a format error.
    return [1.0 if regex.fullmatch(text_of(c).strip()) else 0.0 for c in completions]
