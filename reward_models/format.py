"""Format rewards: does the completion follow the requested layout?"""

from __future__ import annotations

import re
from typing import Any

from reward_models.registry import register, text_of

THINK_ANSWER = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


@register("format")
def format_reward(prompts: list, completions: list, pattern: str = THINK_ANSWER, **kwargs: Any) -> list[float]:
    """1.0 when the whole completion matches `pattern` (default: <think>…</think> <answer>…</answer>)."""
    regex = re.compile(pattern, re.DOTALL)
    return [1.0 if regex.fullmatch(text_of(c).strip()) else 0.0 for c in completions]
