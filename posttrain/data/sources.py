"""Data sources: local files, saved dataset dirs, hub datasets and synthetic tasks, all as a `datasets.Dataset`.

A source is a mapping from a recipe, e.g. `{path: data/train.jsonl, columns: {prompt: question}}`,
`{path: openai/gsm8k, config: main, split: test, format: gsm8k}` or `{synthetic: arithmetic, split: eval}`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

SOURCE_KEYS = ("path", "synthetic", "split", "config", "format", "columns", "limit", "shuffle_seed", "schema",
               "n", "seed", "digits", "carry_drop", "eval_fraction")  # fmt: skip
SYNTHETIC_KEYS = ("n", "seed", "digits", "carry_drop", "eval_fraction")
FORMATS = ("gsm8k",)
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


def load_source(spec: Mapping[str, Any], *, base_dir: Path | None = None, origin: str = "data"):
    """Load, reformat, rename, subset and (optionally) validate one data source."""
    from posttrain.data.schemas import validate
    from posttrain.recipe import suggest

    if not isinstance(spec, Mapping):
        raise DataError(f"{origin}: a data source must be a mapping (path: ... or synthetic: ...), got {spec!r}")
    for key in spec:
        if key not in SOURCE_KEYS:
            raise DataError(
                f"{origin}: unknown key '{key}'{suggest(key, SOURCE_KEYS)} (valid: {', '.join(SOURCE_KEYS)})"
            )
    if ("path" in spec) == ("synthetic" in spec):
        raise DataError(f"{origin}: give exactly one of 'path' (file, dir or hub id) or 'synthetic'")

    if "synthetic" in spec:
        ds = _synthetic(spec, origin)
    else:
        local = _resolve(str(spec["path"]), base_dir)
        ds = _load_path(str(spec["path"]), local, spec, origin)
        if local is not None:
            origin = f"{origin} ({local})"  # row errors below name the file too

    if spec.get("format"):
        ds = _apply_format(ds, spec["format"], origin)
    if spec.get("columns"):
        ds = _map_columns(ds, spec["columns"], origin)
    if spec.get("shuffle_seed") is not None:
        ds = ds.shuffle(seed=int(spec["shuffle_seed"]))
    if spec.get("limit") is not None:
        ds = ds.select(range(min(int(spec["limit"]), len(ds))))
    if spec.get("schema"):
        validate(ds, spec["schema"], origin)
    return ds


def _synthetic(spec: Mapping[str, Any], origin: str):
    from posttrain.data.arithmetic import arithmetic_split

    name = spec["synthetic"]
    if name != "arithmetic":
        raise DataError(f"{origin}: unknown synthetic task '{name}' (known: arithmetic)")
    kwargs = {k: spec[k] for k in SYNTHETIC_KEYS if k in spec}
    try:
        return arithmetic_split(spec.get("split", "train"), **kwargs)
    except DataError as err:
        raise DataError(f"{origin}: {err}") from err


def _resolve(path: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(path).expanduser()]
    if base_dir is not None and not Path(path).is_absolute():
        candidates.insert(0, base_dir / path)
    return next((c for c in candidates if c.exists()), None)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(_SUFFIXES) or path.count("/") != 1


def _load_path(path: str, local: Path | None, spec: Mapping[str, Any], origin: str):
    split = spec.get("split", "train")
    if local is None:
        if _looks_local(path):
            raise DataError(f"{origin}: file not found: {path}")
        return _load_hub(path, spec.get("config"), split, origin)
    where = f"{origin} ({local})"
    if local.is_dir():
        return _load_saved(local, split, where)
    name = local.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(local, where)
    if name.endswith(".json"):
        return _read_json(local, where)
    from datasets import Dataset

    try:
        if name.endswith(".parquet"):
            return Dataset.from_parquet(str(local))
        if name.endswith(".csv"):
            return Dataset.from_csv(str(local))
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{where}: cannot read: {err}") from err
    raise DataError(f"{where}: unsupported file type (use {', '.join(_SUFFIXES)} or a saved dataset dir)")


def _read_jsonl(path: Path, where: str):

    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: line {lineno} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{where}: line {lineno} is not a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{where}: has no rows")
    return _from_rows(rows, where)


def _read_json(path: Path, where: str):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON (line {err.lineno}: {err.msg})") from err
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} layouts
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{where}: expected a list of rows (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{where}: expected a list of JSON objects")
    return _from_rows(data, where)


def _from_rows(rows: list[dict[str, Any]], where: str):
    from datasets import Dataset

    # Keys missing from some rows become None (validate() reports them with their row number).
    keys = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return Dataset.from_list([{k: row.get(k) for k in keys} for row in rows])
    except Exception as err:  # pyarrow type clashes between rows
        raise DataError(f"{where}: rows have inconsistent types: {err}") from err


def _load_saved(path: Path, split: str, where: str):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{where}: not a dataset saved with save_to_disk: {err}") from err
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{where}: no split '{split}' (splits: {', '.join(ds)})")
        return ds[split]
    return ds


def _load_hub(name: str, config: str | None, split: str, origin: str):
    import datasets

    try:
        return datasets.load_dataset(name, name=config, split=split)
    except Exception as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataError(
            f"{origin}: could not load '{name}' from the Hugging Face hub ({reason}); it is not a local file either "
            "— pass a local path (jsonl/json/parquet/csv or a saved dataset dir)"
        ) from err


def _apply_format(ds, fmt: str, origin: str):
    if fmt != "gsm8k":
        raise DataError(f"{origin}: unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    for col in ("question", "answer"):
        if col not in ds.column_names:
            raise DataError(f"{origin}: format gsm8k needs a '{col}' column (columns: {', '.join(ds.column_names)})")
    for i, text in enumerate(ds["answer"]):
        if not isinstance(text, str) or "####" not in text:
            raise DataError(f"{origin}: row {i + 1}: gsm8k answer has no '#### <number>' line")

    def convert(row):
        return {"prompt": row["question"], "answer": row["answer"].split("####")[-1].strip().replace(",", ""),
                "solution": row["answer"]}  # fmt: skip

    return ds.map(convert, remove_columns=["question"], desc="gsm8k format")


def _map_columns(ds, columns: Mapping[str, str], origin: str):
    if not isinstance(columns, Mapping):
        raise DataError(f"{origin}: 'columns' must map target names to source columns, e.g. {{prompt: question}}")
    for target, source in columns.items():
        if source not in ds.column_names:
            raise DataError(
                f"{origin}: columns.{target}: no column '{source}' in the data (columns: {', '.join(ds.column_names)})"
            )
    # Rename in one go; a target that already exists (and isn't itself renamed away) is replaced.
    clash = [t for t in columns if t in ds.column_names and t not in columns.values()]
    if clash:
        ds = ds.remove_columns(clash)
    return ds.rename_columns({s: t for t, s in columns.items() if s != t})
