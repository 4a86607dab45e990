"""User-facing errors of `reward_models` and the "did you mean" helper every error message uses.

`reward_models` stands on its own (the reward server, a user's own RL loop), so its errors live here; posttrain's
errors (`posttrain.errors`) build on the same base, so a CLI that catches `UserError` catches both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Something the user has to fix (a name, a file, a row, a key); CLIs print it without a traceback."""


class RewardError(UserError):
    """A reward function can't be resolved or raised while scoring."""


class ModelError(UserError):
    """A model or tokenizer can't be loaded."""


def closest(name: str, options: Iterable[str]) -> str | None:
    """The option closest to `name` (difflib, cutoff 0.6), or None when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when nothing is close."""
    close = closest(name, options)
    return f" (did you mean '{close}'?)" if close else ""


LISTED = 30  # valid names listed in full up to this many (a library config's ~170 fields are not)


def unknown_key(key: object, valid: Iterable[str], place: str = "", noun: str = "key") -> str:
    """The one message for a name nobody knows, used by every layer:
    "unknown key 'pth' in data.train (did you mean 'path'?); valid: path, split, ..." (the list when it is short)."""
    names = [str(v) for v in valid]
    where = "" if not place else f" {place}" if place.startswith(("in ", "at ", "of ")) else f" in {place}"
    listed = f"; valid: {', '.join(names)}" if 0 < len(names) <= LISTED else ""
    return f"unknown {noun} '{key}'{where}{suggest(str(key), names)}{listed}"
