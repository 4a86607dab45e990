"""Mixtures: `data.train` as a list of sources, interleaved with `datasets.interleave_datasets` (seeded, each
source's `weight` its sampling probability, stopping when the first or all sources are exhausted).

`datasets` does the interleaving; this module adds what it lacks for a recipe: each source loaded and validated on its
own (errors name `data.train[i]`, its file and row), the refusal of a chat source mixed with a plain-text one, the
columns reduced to those every source has (interleaving needs one schema), and each source's realised share, counted
on the mixed rows and written to the run dir (`mixture.json`, `posttrain.runs.MIXTURE_FILE`) and its report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError, unknown_key

if TYPE_CHECKING:
    from datasets import Dataset

MIX_KEYS = ("mix", "stopping", "seed", "schema")
STOPPING = ("first_exhausted", "all_exhausted")
SOURCE_COLUMN = "_mixture_source"  # each mixed row's source index, until `realised_shares` takes it off


def is_mixture(spec: Any) -> bool:
    return isinstance(spec, Mapping) and "mix" in spec


def mixture_entries(spec: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, source without its weight) of each source of a mixture: `data.train[i]`."""
    entries = spec.get("mix")
    if not isinstance(entries, list):
        return []
    return [
        (f"[{i}]", {k: v for k, v in e.items() if k != "weight"})
        for i, e in enumerate(entries)
        if isinstance(e, Mapping)
    ]


def load_mixture(
    spec: Mapping[str, Any], *, base_dir: Path | None, origin: str, load: Callable[..., Dataset]
) -> Dataset:
    """The interleaved rows of `spec` ({"mix": [sources], "stopping", "seed", "schema"}), with SOURCE_COLUMN; each
    source read with `load` (posttrain.data.sources.load_source, which hands a mixture here)."""
    from datasets import interleave_datasets

    weights = _check(spec, origin)
    parts, names = [], []
    for (label, source), entry in zip(mixture_entries(spec), spec["mix"], strict=True):
        if spec.get("schema") is not None:
            source["schema"] = spec["schema"]
        parts.append(load(source, base_dir=base_dir, origin=f"{origin}{label}"))
        names.append(f"{origin}{label} ({entry.get('path') or entry.get('synthetic')})")
    _same_kind(parts, names)
    columns = [c for c in parts[0].column_names if all(c in p.column_names for p in parts[1:])]
    parts = [p.select_columns(columns) for p in parts]
    for i, part in enumerate(parts[1:], start=1):
        if part.features != parts[0].features:
            try:
                parts[i] = part.cast(parts[0].features)
            except (ValueError, TypeError) as err:
                raise DataError(f"{names[i]}: its columns' types differ from {names[0]}'s and cannot be cast "
                                f"({parts[0].features} vs {part.features}): {err}") from err  # fmt: skip
    parts = [p.add_column(SOURCE_COLUMN, [i] * len(p)) for i, p in enumerate(parts)]
    total = sum(weights)
    return interleave_datasets(parts, probabilities=[w / total for w in weights], seed=int(spec.get("seed") or 0),
                               stopping_strategy=spec.get("stopping", STOPPING[0]))  # fmt: skip


def _check(spec: Mapping[str, Any], origin: str) -> list[float]:
    for key in spec:
        if key not in MIX_KEYS:
            raise DataError(f"{origin}: {unknown_key(key, MIX_KEYS, 'a mixture')}")
    entries = spec["mix"]
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{origin}: a mixture needs a list of at least one source")
    if spec.get("stopping", STOPPING[0]) not in STOPPING:
        raise DataError(f"{origin}: mixture stopping must be one of {', '.join(STOPPING)}, got {spec['stopping']!r}")
    weights = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DataError(f"{origin}[{i}]: a data source must be a mapping (path: ... or synthetic: ...)")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise DataError(f"{origin}[{i}].weight must be a number > 0, got {weight!r}")
        weights.append(float(weight))
    return weights


def _same_kind(parts: list[Dataset], names: list[str]) -> None:
    """A chat source (messages, or prompts that are message lists) mixed with a plain-text one is refused: one run
    renders its rows one way."""
    from posttrain.data.chat import is_conversation

    def kind(ds: Dataset) -> str:
        if "messages" in ds.column_names:
            return "chat conversations (messages)"
        if "prompt" in ds.column_names and len(ds) and is_conversation(ds[0]["prompt"]):
            return "chat prompts (message lists)"
        return "plain text"

    kinds = [kind(p) for p in parts]
    for name, k in zip(names[1:], kinds[1:], strict=True):
        if k != kinds[0]:
            raise DataError(f"{name} holds {k} but {names[0]} holds {kinds[0]}: a mixture's sources must be of one "
                            "kind; convert one (e.g. plain prompts to [{role: user, content: ...}] rows)")  # fmt: skip


def realised_shares(rows: Dataset, spec: Mapping[str, Any], origin: str) -> tuple[Dataset, dict[str, Any] | None]:
    """(`rows` without SOURCE_COLUMN, the mixture's summary: per source its weight, requested and realised share
    and row count), or (`rows`, None) for a single source."""
    if SOURCE_COLUMN not in rows.column_names:
        return rows, None
    counts = [0] * len(spec["mix"])
    for index in rows[SOURCE_COLUMN]:
        counts[index] += 1
    weights = [float(e.get("weight", 1)) for e in spec["mix"]]
    sources = [
        {"source": f"{origin}[{i}]", "data": e.get("path") or e.get("synthetic"), "weight": w,
         "requested": round(w / sum(weights), 4), "rows": n, "realised": round(n / max(len(rows), 1), 4)}
        for i, (e, w, n) in enumerate(zip(spec["mix"], weights, counts, strict=True))
    ]  # fmt: skip
    summary = {"rows": len(rows), "stopping": spec.get("stopping"), "seed": spec.get("seed"), "sources": sources}
    return rows.remove_columns(SOURCE_COLUMN), summary


def write_summary(run_path: Path, summary: Mapping[str, Any]) -> None:
    from posttrain.runs import MIXTURE_FILE, write_atomic

    write_atomic(run_path / MIXTURE_FILE, json.dumps(summary, indent=1))
