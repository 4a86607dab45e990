"""The scorer protocol: what the reward server serves and what model-backed rewards (POLAR, classic RMs) wrap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Scorer(Protocol):
    """Scores (prompt, completion[, reference]) triples in one batch call, one float per completion.

    Items are strings; implementations may also accept TRL's conversational form (a list of
    `{"role", "content"}` messages), which the reward server passes through unchanged. A scorer that needs
    references (POLAR) raises when they are missing; one that cannot use them says what it does with them.
    """

    def score(self, prompts: list[str], completions: list[str], references: list[str] | None = None) -> list[float]:
        """One score per completion, in input order."""
        ...


def is_messages(value: Any) -> bool:
    """A chat message list: [{role, content}, ...] (a string is not one)."""
    return (
        not isinstance(value, str)
        and isinstance(value, Sequence)
        and all(isinstance(m, Mapping) and "content" in m for m in value)
    )


def messages_text(value: Any) -> str:
    """A prompt or completion as plain text: a string as is, a message list as its contents joined by newlines."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        return "\n".join(str(m["content"]) for m in value)
    return str(value)
