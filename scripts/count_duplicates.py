"""Count repeated prompts in a training file: rows, distinct prompts, repeats, and how many copies they come in.

    python scripts/count_duplicates.py data/dapo-math-17k_10boxed.parquet --column prompt

Written for the NFT 7B recipe's claim that its DAPO-Math file is deduplicated: the hub's
BytedTsinghua-SIA/DAPO-Math-17k holds each of its ~17k prompts about 100 times (its 1.79M rows; DAPO issue #36,
verl issue #3065), and a file trained "for one epoch" means a different run in each case. Reads .parquet, .jsonl,
.json and .csv; the column may be dotted into a nested field (reward_model.ground_truth); a list or mapping (chat
messages) compares by its JSON form.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def values(path: Path, column: str) -> list[str]:
    from datasets import load_dataset

    if path.suffix not in FORMATS:
        sys.exit(f"{path}: unknown format (known: {', '.join(FORMATS)})")
    rows = load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
    head, *rest = column.split(".")
    if head not in rows.column_names:
        sys.exit(f"{path}: no column {head!r} (columns: {', '.join(rows.column_names)})")
    out = []
    for i, value in enumerate(rows[head]):
        for key in rest:
            if not isinstance(value, dict) or key not in value:
                sys.exit(f"{path}: row {i}: no field {column!r}")
            value = value[key]
        out.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False))
    return out


def summary(keys: list[str]) -> dict[str, object]:
    counts = collections.Counter(keys)
    copies = collections.Counter(counts.values())  # copies per distinct prompt -> how many prompts come that often
    return {"rows": len(keys), "distinct": len(counts), "repeats": len(keys) - len(counts),
            "most_copies": max(counts.values(), default=0), "copies": dict(sorted(copies.items()))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--column", default="prompt", help="the field compared (dotted for nested; default prompt)")
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    args = parser.parse_args()
    stats = summary(values(args.path, args.column))
    if args.json:
        print(json.dumps(stats))
        return
    print(f"{args.path}: {stats['rows']:,} rows, {stats['distinct']:,} distinct {args.column!r}, "
          f"{stats['repeats']:,} rows repeat an earlier one; most copies of one: {stats['most_copies']}")  # fmt: skip
    for n, prompts in stats["copies"].items():
        print(f"  {prompts:,} prompts appear {n} time{'s' if n > 1 else ''}")


if __name__ == "__main__":
    main()
