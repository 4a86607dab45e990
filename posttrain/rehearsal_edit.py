"""What a trainer's `--rehearse` hook edits: the recipe's `training:`, `algorithm:` and `rollout:` mappings, shrunk to a
rehearsal of `steps` optimizer steps on 2 CPU processes, each change noted for the rehearsal's README.

`posttrain.rehearse` (the driver) makes one `RehearsalEdit` per rehearsal and calls the trainer module's
`rehearse(edit)` when it has one, else `edit.shrink_batch()` and `edit.train_steps()` (what a trainer over a
transformers Trainer needs). A trainer whose batch is shaped otherwise (generation groups, diffusion stages) writes its
own hook in its module; the driver names no trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RehearsalEdit:
    recipe: Any  # the validated source recipe (its `settings` hold the values with their defaults)
    raw: dict[str, Any]  # the recipe's mapping being rewritten
    steps: int
    note: Callable[[str], None]  # a substitution ("x: a -> b"), listed under "substituted"
    did: Callable[[str], None]  # what the rehearsal exercises, listed under "exercised"
    max_accumulation: int = 2
    max_batch: int = 2
    workdir: Path | None = None  # the rehearsal's directory: where a hook writes a stand-in of its own (a teacher)

    @property
    def training(self) -> dict[str, Any]:
        return self.raw.setdefault("training", {})

    @property
    def algorithm(self) -> dict[str, Any]:
        return self.raw.setdefault("algorithm", {})

    @property
    def rollout(self) -> dict[str, Any]:
        return self.raw.setdefault("rollout", {})

    def value(self, key: str) -> Any:
        """The source recipe's value of a training/algorithm setting (the library's default when unset)."""
        return self.recipe.settings.get(key)

    def shrink_batch(self, per_device: int | None = None) -> None:
        """At most `max_batch` rows per device (or `per_device`) and `max_accumulation` micro-batches a step."""
        old_batch, old_accum = int(self.value("per_device_train_batch_size")), int(self.value("gradient_accumulation_steps"))  # fmt: skip
        batch = min(old_batch, self.max_batch) if per_device is None else per_device
        accum = min(old_accum, self.max_accumulation)
        self.training.update(per_device_train_batch_size=batch, gradient_accumulation_steps=accum)
        self.note(f"batch: {old_batch} per device x {old_accum} accumulation -> {batch} x {accum}")

    def train_steps(self) -> None:
        """`steps` optimizer steps, a checkpoint and a log line after each (epochs, eval steps, limits dropped)."""
        for key in ("num_train_epochs", "eval_steps", "save_total_limit"):
            self.training.pop(key, None)
        self.training.update(max_steps=self.steps, save_steps=1, logging_steps=1)
        self.note(f"training: {self.steps} optimizer steps, a checkpoint each")

    def cap(self, section: str, key: str, limit: int) -> None:
        """`section.key` at most `limit` when the recipe sets it higher."""
        values = self.raw.get(section) or {}
        if isinstance(values.get(key), int) and values[key] > limit:
            self.note(f"{section}.{key}: {values[key]} -> {limit}")
            values[key] = limit
