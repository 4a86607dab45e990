"""Data sources: local files, saved dataset dirs, hub datasets and synthetic tasks, all as a `datasets.Dataset`.

A source is a mapping from a recipe, e.g. `{path: data/train.jsonl, columns: {prompt: question}}`,
`{path: openai/gsm8k, config: main, split: test, format: gsm8k}` or `{synthetic: arithmetic, split: eval}`.
Steps run in this order: load, `format`, `columns`, `shuffle_seed`, `limit`, `schema`.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError, unknown_key

if TYPE_CHECKING:
    from datasets import Dataset

PATH_KEYS = ("path", "config", "data_dir")
# Each synthetic task's keyword arguments (posttrain.data.arithmetic / posttrain.data.markov).
SYNTHETIC_TASK_OPTIONS = {
    "arithmetic": ("n", "seed", "digits", "carry_drop", "eval_fraction"),
    "polar_markov": ("n", "seed", "world_seed", "policies"),
    "tool_arithmetic": ("n", "seed", "tool_rate", "direct_accuracy", "eval_fraction"),
}
SYNTHETIC_OPTIONS = tuple(dict.fromkeys(o for opts in SYNTHETIC_TASK_OPTIONS.values() for o in opts))
SYNTHETIC_KEYS = ("synthetic", *SYNTHETIC_OPTIONS)
COMMON_KEYS = ("split", "format", "columns", "limit", "shuffle_seed", "schema")
SOURCE_KEYS = PATH_KEYS + SYNTHETIC_KEYS + COMMON_KEYS
SYNTHETIC_TASKS = tuple(SYNTHETIC_TASK_OPTIONS)
FORMATS = ("gsm8k",)
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
# Hub ids are "owner/name" (or a bare legacy name) and have no file extension; "Llama-3.1-8B" is not one.
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")
# What save_to_disk writes; a directory without these is read as a folder of data files instead.
_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def load_source(spec: Mapping[str, Any], *, base_dir: Path | None = None, origin: str = "data") -> Dataset:
    """Load, reformat, rename, subset and (optionally) validate one data source.

    `origin` (e.g. "recipes/grpo/x.yaml: data.train") starts every error message; errors about a local file's
    rows also name the file.
    """
    from posttrain.data.mixture import is_mixture, load_mixture
    from posttrain.data.schemas import validate

    if is_mixture(spec):  # data.train as a list of sources
        return load_mixture(spec, base_dir=base_dir, origin=origin, load=load_source)
    _check_spec(spec, origin)
    lines: list[int] | None = None  # each row's line in a jsonl file; None when row i is simply number i + 1
    if "synthetic" in spec:
        ds = _synthetic(spec, origin)
    else:
        local = _resolve(str(spec["path"]), base_dir)
        ds, lines = _load_path(str(spec["path"]), local, base_dir, spec, origin)
        if local is not None:
            origin = f"{origin} ({local})"

    if spec.get("format") is not None:
        ds = _apply_format(ds, spec["format"], origin, lines)
    if spec.get("columns") is not None:
        ds = _map_columns(ds, spec["columns"], origin)
    order = None
    if spec.get("shuffle_seed") is not None:
        import numpy as np

        # The permutation Dataset.shuffle draws, kept so row errors below still give the row's place in the file.
        order = np.random.default_rng(_int_option(spec, "shuffle_seed", origin)).permutation(len(ds)).tolist()
    if spec.get("limit") is not None:
        limit = _int_option(spec, "limit", origin)
        order = order[:limit] if order is not None else list(range(min(limit, len(ds))))
    if order is not None:
        ds = ds.select(order)
    if spec.get("schema") is not None:
        numbers = lines if order is None else [lines[i] if lines else i + 1 for i in order]
        schema = conversational_schema(ds, paired_schema(ds, spec["schema"]))
        if _wants_split(ds, schema):
            from posttrain.data.chat import split_transcripts

            ds = split_transcripts(ds, origin, numbers)
        validate(ds, schema, origin, row_numbers=numbers)
    return ds


def paired_schema(ds: Dataset, schema: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """The fields to check in `ds`: unpaired preference rows (completion + label) are read as pairs when the source
    holds chosen/rejected and neither completion nor label (each pair is one desirable and one undesirable row; the
    trainer unpairs them). Transcripts without a prompt column are then split like any preference pair."""
    from posttrain.data.schemas import SCHEMAS

    fields = SCHEMAS[schema] if isinstance(schema, str) and schema in SCHEMAS else tuple(schema)
    columns = set(ds.column_names)
    pairs = bool({"chosen", "rejected"} & columns) and not {"completion", "label"} & columns
    if pairs and {"completion", "label"} <= set(fields):
        return tuple(f for f in fields if f not in ("completion", "label")) + ("chosen", "rejected")
    return schema


def conversational_schema(ds: Dataset, schema: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """The fields to check in `ds`: prompt/completion become `messages` for rows that are conversations (SFT's
    other input, rendered by the chat template). Rows with `messages` and no `completion` are conversations even
    when they also carry a `prompt` (e.g. tool_arithmetic's, whose prompt is what RL samples from)."""
    from posttrain.data.schemas import SCHEMAS

    fields = SCHEMAS[schema] if isinstance(schema, str) and schema in SCHEMAS else tuple(schema)
    columns = ds.column_names
    if {"prompt", "completion"} <= set(fields) and "messages" in columns and "completion" not in columns:
        return tuple(f for f in fields if f not in ("prompt", "completion")) + ("messages",)
    return schema


def _wants_split(ds: Dataset, schema: str | tuple[str, ...]) -> bool:
    """Preference rows without a prompt column: chosen/rejected are whole transcripts sharing one."""
    from posttrain.data.schemas import SCHEMAS

    fields = SCHEMAS[schema] if isinstance(schema, str) and schema in SCHEMAS else tuple(schema)
    columns = ds.column_names
    return (
        {"prompt", "chosen", "rejected"} <= set(fields)
        and "prompt" not in columns
        and {"chosen", "rejected"} <= set(columns)
    )


def _check_spec(spec: Any, origin: str) -> None:

    if not isinstance(spec, Mapping):
        raise DataError(f"{origin}: a data source must be a mapping (path: ... or synthetic: ...), got {spec!r}")
    for key in spec:
        if key not in SOURCE_KEYS:
            raise DataError(f"{origin}: {unknown_key(key, SOURCE_KEYS, 'a data source')}")
    if ("path" in spec) == ("synthetic" in spec):
        raise DataError(f"{origin}: give exactly one of 'path' (file, dir or hub id) or 'synthetic'")
    # A key of the other kind of source would be silently ignored, so say so instead.
    kind, other = ("path", SYNTHETIC_KEYS) if "path" in spec else ("synthetic", PATH_KEYS)
    for key in other:
        if key in spec:
            raise DataError(f"{origin}: '{key}' does not apply to a {kind} source")


def _int_option(spec: Mapping[str, Any], key: str, origin: str) -> int:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{origin}: {key} must be a non-negative integer, got {value!r}")
    return value


def _synthetic(spec: Mapping[str, Any], origin: str) -> Dataset:
    from posttrain.data.arithmetic import arithmetic_split
    from posttrain.data.markov import polar_markov_split
    from posttrain.data.tool_arithmetic import tool_arithmetic_split

    name = spec["synthetic"]
    if name not in SYNTHETIC_TASKS:
        raise DataError(f"{origin}: {unknown_key(name, SYNTHETIC_TASKS, noun='synthetic task')}")
    allowed = SYNTHETIC_TASK_OPTIONS[name]
    stray = [k for k in SYNTHETIC_OPTIONS if k in spec and k not in allowed]
    if stray:
        raise DataError(f"{origin}: {unknown_key(stray[0], allowed, f'synthetic task {name!r}', noun='option')}")
    kwargs = {k: spec[k] for k in allowed if k in spec}
    build = {"polar_markov": polar_markov_split, "tool_arithmetic": tool_arithmetic_split}.get(name, arithmetic_split)
    try:
        return build(spec.get("split", "train"), **kwargs)
    except DataError as err:
        raise DataError(f"{origin}: {err}") from err


def _resolve(path: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(path).expanduser()]
    if base_dir is not None and not Path(path).is_absolute():
        candidates.insert(0, Path(base_dir) / path)
    return next((c for c in candidates if c.exists()), None)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or bool(_EXTENSION.search(path))


def _load_path(
    path: str, local: Path | None, base_dir: Path | None, spec: Mapping[str, Any], origin: str
) -> tuple[Dataset, list[int] | None]:
    split = spec.get("split", "train")
    if local is None:
        if _looks_local(path):
            dirs = (
                []
                if Path(path).expanduser().is_absolute()
                else [*([str(base_dir)] if base_dir else []), str(Path.cwd())]
            )
            looked = f" (looked in {' and '.join(dirs)})" if dirs else ""
            raise DataError(f"{origin}: file not found: {path}{looked}")
        return _load_hub(path, spec.get("config"), spec.get("data_dir"), split, origin), None
    where = f"{origin} ({local})"
    if local.is_dir():
        return _load_dir(local, spec, split, where), None
    name = local.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(local, where)
    if name.endswith(".json"):
        return _read_json(local, where)
    from datasets import Dataset

    try:
        if name.endswith(".parquet"):
            return Dataset.from_parquet(str(local)), None
        if name.endswith(".csv"):
            return Dataset.from_csv(str(local)), None
    except Exception as err:  # pyarrow and pandas raise many types for unreadable files
        raise DataError(f"{where}: cannot read: {_first_line(err)}") from err
    raise DataError(f"{where}: unsupported file type (use {', '.join(SUFFIXES)} or a saved dataset dir)")


def jsonl_rows(path: Path, where: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The JSON objects of a .jsonl(.gz) file and their line numbers (blank lines skipped); a bad line is named."""
    opener = gzip.open if path.name.endswith(".gz") else open
    rows, lines = [], []
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
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
                lines.append(lineno)
    except (OSError, UnicodeDecodeError, EOFError) as err:  # bad gzip stream, not UTF-8 text
        raise DataError(f"{where}: cannot read: {_first_line(err)}") from err
    return rows, lines


def _read_jsonl(path: Path, where: str) -> tuple[Dataset, list[int] | None]:
    """The rows, and their line numbers when blank lines make those differ from the row numbers."""
    rows, lines = jsonl_rows(path, where)
    if not rows:
        raise DataError(f"{where}: has no rows")
    return _from_rows(rows, where), (None if lines[-1] == len(lines) else lines)


def _read_json(path: Path, where: str) -> tuple[Dataset, list[int] | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines under a .json name, which is what Dataset.to_json writes
            return _read_jsonl(path, where)
        raise DataError(f"{where}: not valid JSON (line {err.lineno}: {err.msg})") from err
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} layouts
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{where}: expected a list of rows (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{where}: expected a list of JSON objects")
    if not data:
        raise DataError(f"{where}: has no rows")
    return _from_rows(data, where), None


def _from_rows(rows: list[dict[str, Any]], where: str) -> Dataset:
    from datasets import Dataset

    # Keys missing from some rows become None (validate() reports them with their row number).
    keys = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return Dataset.from_list([{k: row.get(k) for k in keys} for row in rows])
    except Exception as err:  # pyarrow type clashes between rows
        raise DataError(f"{where}: {_type_clash(rows) or 'rows have inconsistent types: ' + _first_line(err)}") from err


def _type_clash(rows: list[dict[str, Any]]) -> str | None:
    """'column 'x' is a string in row 1 but a number in row 7', or None when the clash is deeper than that."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows, start=1):
        for key, value in row.items():
            if value is None:
                continue
            kind = names.get(type(value), type(value).__name__)
            seen_kind, seen_row = first.setdefault(key, (kind, i))
            if kind != seen_kind:
                return f"column '{key}' is {seen_kind} in row {seen_row} but {kind} in row {i}; make it one type"
    return None


def _load_dir(path: Path, spec: Mapping[str, Any], split: str, where: str) -> Dataset:
    import datasets

    if not any((path / marker).exists() for marker in _SAVED_MARKERS):
        # A folder of data files, e.g. a hub dataset downloaded with `hf download --local-dir`.
        try:
            return datasets.load_dataset(str(path), name=spec.get("config"), data_dir=spec.get("data_dir"), split=split)
        except Exception as err:
            raise DataError(
                f"{where}: a directory that is neither a dataset saved with save_to_disk nor a folder of data files "
                f"that datasets can read ({_first_line(err)})"
            ) from err
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{where}: cannot read the saved dataset: {_first_line(err)}") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{where}: no split '{split}' (splits: {', '.join(ds)})")
        return ds[split]
    return ds


def _load_hub(name: str, config: str | None, data_dir: str | None, split: str, origin: str) -> Dataset:
    import datasets

    try:
        return datasets.load_dataset(name, name=config, data_dir=data_dir, split=split)
    except Exception as err:
        raise DataError(
            f"{origin}: could not load '{name}' from the Hugging Face hub ({_first_line(err)}); it is not a local file "
            "either — pass a local path (jsonl/json/parquet/csv or a saved dataset dir)"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _apply_format(ds: Dataset, fmt: str, origin: str, lines: list[int] | None) -> Dataset:
    if fmt not in FORMATS:
        raise DataError(f"{origin}: unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    for col in ("question", "answer"):
        if col not in ds.column_names:
            raise DataError(f"{origin}: format gsm8k needs a '{col}' column (columns: {', '.join(ds.column_names)})")
    for i, text in enumerate(ds["answer"]):
        if not isinstance(text, str) or "####" not in text:
            raise DataError(f"{origin}: row {lines[i] if lines else i + 1}: gsm8k answer has no '#### <number>' line")

    def convert(question: str, answer: str) -> dict[str, str]:
        # GSM8K's final line is "#### 1,000"; graders compare the bare number.
        final = answer.rsplit("####", 1)[1].strip().replace(",", "")
        return {"prompt": question, "answer": final, "solution": answer}

    return ds.map(convert, input_columns=["question", "answer"], remove_columns=["question"], desc="gsm8k format")


def _map_columns(ds: Dataset, columns: Any, origin: str) -> Dataset:
    """Rename source columns to target names; a source named by two targets is copied."""
    if not isinstance(columns, Mapping) or not all(isinstance(v, str) for v in columns.values()):
        raise DataError(f"{origin}: 'columns' must map target names to source columns, e.g. {{prompt: question}}")
    available = ds.column_names
    if any("." in s and s not in available for s in columns.values()):
        # A dotted source names a field inside a struct column (verl-style data: reward_model.ground_truth);
        # datasets' flatten() exposes every struct field as a "parent.field" column.
        ds = ds.flatten()
        available = ds.column_names
    for target, source in columns.items():
        if source not in available:
            raise DataError(
                f"{origin}: columns.{target}: no column '{source}' in the data (columns: {', '.join(available)})"
            )
    first_target: dict[str, str] = {}
    copies: list[tuple[str, str]] = []
    for target, source in columns.items():
        if source in first_target:
            copies.append((str(target), source))
        else:
            first_target[source] = str(target)
    # A target that already exists and isn't itself a source is replaced by the mapped column.
    replaced = [t for t in columns if t in available and t not in first_target]
    if replaced:
        ds = ds.remove_columns(replaced)
    renames = {s: t for s, t in first_target.items() if s != t}
    for i, (target, source) in enumerate(copies):
        # Copy under a temporary name, so the renames below (which may swap names) can't collide with it.
        temp = f"__posttrain_copy_{i}"
        ds = ds.add_column(temp, ds.with_format("arrow")[source], feature=ds.features[source])
        renames[temp] = target
    return ds.rename_columns(renames) if renames else ds
