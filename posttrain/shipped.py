"""The recipes and eval suites posttrain ships: the checkout's `recipes/` and `eval/suites/` when posttrain runs
from its source tree, else the copies a wheel carries under `posttrain/_shipped/` (setup.py puts them there, with
the same layout, so a recipe's relative `../../eval/suites/x.yaml` resolves in both)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped_root() -> Path:
    checkout = PACKAGE.parent
    if (checkout / "recipes").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout
    return PACKAGE / "_shipped"


def recipes_dir() -> Path:
    return shipped_root() / "recipes"


def suites_dir() -> Path:
    return shipped_root() / "eval" / "suites"


def find_shipped(arg: str, kind: str = "recipes") -> Path:
    """`arg` as given when that file exists; else the shipped file it names, so that the README's
    `recipes/sft/arithmetic.yaml` (or `sft/arithmetic`) works from any directory. Unchanged when neither exists
    (the caller reports the path the user typed)."""
    path = Path(arg)
    if path.exists() or path.is_absolute():
        return path
    base = recipes_dir() if kind == "recipes" else suites_dir()
    prefix = ("recipes",) if kind == "recipes" else ("eval", "suites")
    parts = path.parts[len(prefix) :] if path.parts[: len(prefix)] == prefix else path.parts
    for candidate in (base.joinpath(*parts), base.joinpath(*parts).with_suffix(".yaml")):
        if parts and candidate.is_file():
            return candidate
    return path
