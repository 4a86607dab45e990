"""Row schemas: the fields each kind of training data needs, checked with row-numbered errors, and `ImageRow`,
the row every image source (posttrain.data.images, posttrain.data.toy_images) yields."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset

SCHEMAS: dict[str, tuple[str, ...]] = {
    "prompt_answer": ("prompt", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),  # chat conversations (posttrain.data.chat), SFT's alternative to prompt/completion
    "preference": ("prompt", "chosen", "rejected"),
    # One completion judged on its own: label true = desirable, false = undesirable (both kinds must occur). A
    # source of pairs is read as pairs instead (sources.paired_schema); the trainer unpairs them.
    "unpaired": ("prompt", "completion", "label"),
    "polar_triplet": ("prompt", "reference", "chosen", "rejected"),
    "prompt_image": ("prompt", "image"),
    "prompt": ("prompt",),
}

# The recipe section an origin names ("x.yaml: data.train", "x.yaml: eval.data"), to point at its columns option.
_SECTION = re.compile(r"(?:^|\s)(data\.\w+|eval\.data)(?=$|[\s:])")


@dataclass(frozen=True)
class ImageRow:
    """One image training row: a prompt, its winning image and (preference data only) the losing one."""

    prompt: str
    winner: Any  # bytes | str path | PIL image | tensor in [-1, 1]
    loser: Any = None
    where: str = ""  # "file: row N" for error messages


def validate(
    ds: Dataset, schema: str | Sequence[str], origin: str, *, row_numbers: Sequence[int] | None = None
) -> None:
    """`schema` is a name in SCHEMAS or a sequence of field names. Raise DataError for an unknown schema, an empty dataset, a missing column, or the first row missing a field.

    A field is missing when it is null (the json loader fills keys absent from a row with None), NaN, a blank
    string or an empty list. Rows are numbered from 1; `row_numbers` gives each row's number in its file instead
    (`load_source` passes the line numbers of a shuffled or subset jsonl file).
    """
    if isinstance(schema, str) and schema not in SCHEMAS:
        raise DataError(f"{origin}: unknown schema '{schema}' (known: {', '.join(SCHEMAS)})")
    if len(ds) == 0:
        raise DataError(f"{origin}: has no rows")
    fields = SCHEMAS[schema] if isinstance(schema, str) else tuple(schema)  # a schema, or the fields themselves
    for name in fields:
        if name not in ds.column_names:
            section = _SECTION.search(origin)
            where = f"{section.group(1)}.columns" if section else "the source's 'columns' option"
            raise DataError(
                f"{origin}: no column '{name}' (columns: {', '.join(ds.column_names)}); "
                f"map one with {where}, e.g. columns: {{{name}: <column>}}"
            )
    # Column-wise on the arrow data: fast on large sets, and never decodes an image column.
    table = ds.with_format("arrow")
    firsts = [i for i in (_first_missing(table[name]) for name in fields) if i is not None]
    if not firsts:
        if "label" in fields:
            _check_labels(table["label"], origin, row_numbers)
        return
    i = min(firsts)
    row = table[i].to_pylist()[0]
    name = next(f for f in fields if _is_missing(row[f]))
    present = ", ".join(k for k, v in row.items() if not _is_missing(v))
    number = row_numbers[i] if row_numbers is not None else i + 1
    raise DataError(f"{origin}: row {number} is missing field '{name}' (row has: {present or 'nothing'})")


def _first_missing(column: pa.ChunkedArray | pa.Array) -> int | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pc.is_null(column, nan_is_null=True)
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        mask = pc.or_kleene(mask, pc.equal(pc.utf8_trim_whitespace(column), ""))
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        mask = pc.or_kleene(mask, pc.equal(pc.list_value_length(column), 0))
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return value != value  # NaN
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, list) and not value


def _check_labels(column: pa.ChunkedArray | pa.Array, origin: str, row_numbers: Sequence[int] | None) -> None:
    """An unpaired preference label is a boolean (true = desirable, false = undesirable), and data of one kind
    only states no preference (the losses over such data weigh desirable against undesirable examples)."""
    import pyarrow as pa

    if not pa.types.is_boolean(column.type):
        values = column.to_pylist()
        i = next(i for i, v in enumerate(values) if not isinstance(v, bool))
        number = row_numbers[i] if row_numbers is not None else i + 1
        raise DataError(
            f"{origin}: row {number}: label must be true (desirable) or false (undesirable), got {values[i]!r}"
        )
    kinds = set(column.to_pylist())
    if len(kinds) == 1:
        names = {True: "true (desirable)", False: "false (undesirable)"}
        (only,) = kinds
        raise DataError(
            f"{origin}: every row's label is {names[only]}; unpaired preference data needs rows labelled "
            f"{names[not only]} too"
        )


def distinct_pairs(rows: Dataset, origin: str, needed_by: str) -> Dataset:
    """Preference rows whose chosen and rejected differ (a pair with no preference teaches nothing); the dropped ones
    are counted on the console, and none left is an error naming the data and `needed_by` (the trainer)."""
    kept = rows.filter(lambda row: row["chosen"] != row["rejected"])
    dropped = len(rows) - len(kept)
    if len(kept) == 0:
        raise DataError(f"{origin}: every pair has chosen == rejected; {needed_by} needs pairs that differ")
    if dropped:
        print(f"{origin}: {dropped} of {len(rows)} pairs have chosen == rejected (no preference) and were dropped")
    return kept
