"""POLAR data: text helpers for building pretraining triplets (random prefixes, repetition-loop cutting), prompt
and row readers, and fine-tuning rows from human rankings or reference-carrying pairs.

The pretraining build itself samples policies, so it lives with generation: `posttrain.rollout.polar_pretrain`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posttrain.data.sources import jsonl_rows
from posttrain.errors import DataError


def random_prefix(text: str, rng: random.Random, lo: int, hi: int) -> str:
    """The first k whitespace-separated words of `text`, k uniform in [lo, hi] (all of it when shorter)."""
    words = text.split()
    return " ".join(words[: rng.randint(lo, hi)])


def truncate_loops(text: str, *, min_span: int = 32, keep: int = 2, max_period: int = 200) -> str:
    """Cut a repetition loop at the end of `text` down to `keep` repeats of its unit (the sample is kept: a
    policy that loops is a policy trait the RM should see, but thousands of repeats teach nothing more)."""
    for period in range(1, min(max_period, len(text) // 4) + 1):
        unit = text[-period:]
        count, end = 1, len(text) - period
        while end >= period and text[end - period : end] == unit:
            count, end = count + 1, end - period
        if count >= 4 and count * period >= min_span:
            return text[: end + keep * period]
    return text


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl file (`field` of each row)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: prompt file not found")
    if path.suffix == ".txt":
        return [line for line in path.read_text().splitlines() if line.strip()]
    rows, lines = jsonl_rows(path, str(path))
    for row, number in zip(rows, lines, strict=True):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(f"{path}: line {number} has no text field '{field}'")
    return [row[field] for row in rows]


def read_jsonl_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a bad line is named by its number."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return jsonl_rows(path, str(path))[0]


def from_rankings(rows: Iterable[Mapping[str, Any]], ranked_field: str = "ranked", where: str = "data") -> list[dict]:
    """Rows with a best-first list of >= 3 responses: reference = the best; every (better, worse) pair of the
    rest becomes (chosen, rejected). Three outputs A > B > C give one row: ref A, chosen B, rejected C."""
    out = []
    for number, row in enumerate(rows, 1):
        ranked = row.get(ranked_field)
        if "prompt" not in row or not isinstance(ranked, list) or len(ranked) < 3:
            raise DataError(f"{where}: row {number} needs 'prompt' and a best-first list '{ranked_field}' of >= 3")
        ref, rest = ranked[0], ranked[1:]
        for i in range(len(rest)):
            for j in range(i + 1, len(rest)):
                out.append({"prompt": row["prompt"], "reference": ref, "chosen": rest[i], "rejected": rest[j]})
    return out


def from_pairs(
    rows: Iterable[Mapping[str, Any]], reference_field: str = "reference", where: str = "data"
) -> list[dict]:
    """Chosen/rejected pairs that carry a reference answer (e.g. a strong model's, or the dataset's gold)."""
    out = []
    for number, row in enumerate(rows, 1):
        missing = [k for k in ("prompt", "chosen", "rejected", reference_field) if not row.get(k)]
        if missing:
            raise DataError(f"{where}: row {number} is missing {', '.join(repr(m) for m in missing)}")
        out.append({"prompt": row["prompt"], "reference": row[reference_field], "chosen": row["chosen"],
                    "rejected": row["rejected"]})  # fmt: skip
    return out
