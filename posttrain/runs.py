"""The run dir contract: `runs/<name>/` holds everything one recipe run produced.

recipe.resolved.yaml   the recipe with every default filled in (`posttrain train` it to reproduce)
metrics.jsonl          one JSON object per log step: step, stage, and the metrics as TRL logs them
checkpoints/           Trainer checkpoints; each complete one carries a `.complete` marker
final/                 the trained model + tokenizer (from_pretrained-loadable)
eval/<name>.json       held-out results before/after training, with per-sample outputs
report.md, *.png       curves and tables
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.recipe import Recipe, to_yaml

COMPLETE_MARKER = ".complete"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def prepare(self, recipe: Recipe, resume: bool) -> None:
        """Create the dir and write the resolved recipe. An existing run is only continued with resume=True."""
        if self.metrics_path.exists() and not resume:
            raise PosttrainError(
                f"{self.path} already holds a run (metrics.jsonl exists). Pass --resume to continue it, or choose "
                f"another output dir with --set output_dir=... (nothing was overwritten)"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / "recipe.resolved.yaml", to_yaml(recipe))

    def append_metrics(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed process; the rest of the file is still good
        return rows

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint that finished writing (a process killed mid-save leaves no marker)."""
        if not self.checkpoints.is_dir():
            return None
        done = []
        for child in self.checkpoints.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", child.name)
            if match and (child / COMPLETE_MARKER).exists():
                done.append((int(match.group(1)), child))
        return max(done)[1] if done else None

    @property
    def final_tmp(self) -> Path:
        return self.path / "final.tmp"

    def swap_in_final(self) -> Path:
        """Replace `final/` by the fully written `final.tmp/`, so a crash mid-save never leaves a half-written
        `final/` where a good one was."""
        old = self.path / "final.old"
        if self.final.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.final.rename(old)
        self.final_tmp.rename(self.final)
        shutil.rmtree(old, ignore_errors=True)
        return self.final


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
