"""Row schemas: the fields each kind of training data needs, checked with row-numbered errors."""

from __future__ import annotations

from typing import Any

from posttrain.errors import DataError

SCHEMAS: dict[str, tuple[str, ...]] = {
    "prompt_answer": ("prompt", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "polar_triplet": ("prompt", "reference", "chosen", "rejected"),
    "prompt_image": ("prompt", "image"),
}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value == "") or (isinstance(value, list) and not value)


def validate(ds: Any, schema: str, origin: str) -> None:
    """Raise DataError for an unknown schema, an empty dataset, a missing column or the first row missing a field.

    Rows are numbered from 1, which for jsonl files is the line number.
    """
    if schema not in SCHEMAS:
        raise DataError(f"{origin}: unknown schema '{schema}' (known: {', '.join(SCHEMAS)})")
    if len(ds) == 0:
        raise DataError(f"{origin}: has no rows")
    fields = SCHEMAS[schema]
    for name in fields:
        if name not in ds.column_names:
            raise DataError(
                f"{origin}: no column '{name}' (columns: {', '.join(ds.column_names)}); "
                f"map one with the source's 'columns:' option"
            )
    for i, row in enumerate(ds.select_columns(list(fields))):
        for name in fields:
            if _missing(row[name]):
                present = ", ".join(k for k, v in row.items() if not _missing(v))
                raise DataError(f"{origin}: row {i + 1} is missing field '{name}' (row has: {present or 'nothing'})")
