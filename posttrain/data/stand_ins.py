"""Synthetic stand-in rows of a schema, for `posttrain train --rehearse` when a recipe's data is not local: text
rows with a value for any field (small sums, with answers, completions, preference pairs and references that fit
them) and Pick-a-Pic rows of random images."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any


def text_rows(fields: tuple[str, ...], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """`n` rows with a value for each of `fields`: small sums as prompts, with answers, completions, preference
    pairs and references that fit them, unpaired labels alternating true/false; any other field gets a short text."""
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        good, bad = f"{a} + {b} = {a + b}. The answer is {a + b}.", f"{a} + {b} = {a + b + 1}. The answer is {a + b + 1}."  # fmt: skip
        known = {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "completion": good, "chosen": good,
                 "rejected": bad, "reference": good, "solution": f"{a} + {b} = {a + b}\n#### {a + b}",
                 "carry": (a % 10 + b % 10) >= 10, "label": i % 2 == 0}  # fmt: skip
        rows.append({f: known.get(f, f"{f} {i}") for f in fields})
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pickapic_rows(target: Path, n: int, rng: random.Random, size: int = 32) -> Path:
    """A Pick-a-Pic parquet file (caption, jpg_0, jpg_1, label_0) of `n` rows of random `size` px PNG images."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png() -> bytes:
        pixels = bytes(rng.randrange(256) for _ in range(size * size * 3))
        buf = io.BytesIO()
        Image.frombytes("RGB", (size, size), pixels).save(buf, format="PNG")
        return buf.getvalue()

    words = ("red", "green", "blue", "square", "cat", "sky")
    rows = [{"caption": f"a {rng.choice(words)} {rng.choice(words)}", "jpg_0": png(), "jpg_1": png(),
             "label_0": float(rng.random() < 0.5)} for _ in range(n)]  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), target)
    return target
