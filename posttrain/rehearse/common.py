"""What the rehearsal's parts share: its size (steps, rows, tokens), the DDP launch it falls back to, and the
`Rehearsal` record of what was substituted, exercised and not rehearsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import RecipeError
from posttrain.recipe import Recipe

STEPS = 2  # optimizer steps a rehearsal trains: a checkpoint at step 1, resumed to step 2
ROWS = 32  # synthetic rows per data source; local sources are cut to this many
EVAL_ROWS = 4  # rows per held-out set and suite benchmark
MAX_NEW_TOKENS = 16
IMAGE_SCORERS_WITH_WEIGHTS = ("pickscore", "hpsv2", "imagereward", "clip", "clip_score", "aesthetic")
DDP_CONFIG = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
              "machine_rank": 0, "num_processes": 2, "mixed_precision": "no", "rdzv_backend": "static",
              "same_network": True, "main_training_function": "main", "use_cpu": False}  # fmt: skip


class RehearsalError(RecipeError):
    """The recipe cannot be rehearsed here (before anything runs): data of a schema that cannot be synthesised."""


@dataclass
class Rehearsal:
    """A prepared rehearsal: the rewritten recipe and launch config in `workdir`, and what was changed."""

    source: Recipe
    workdir: Path
    recipe_path: Path
    accelerate_config: Path
    substituted: list[str] = field(default_factory=list)
    exercised: list[str] = field(default_factory=list)
    not_rehearsed: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    def note(self, text: str) -> None:
        self.substituted.append(text)

    def did(self, text: str) -> None:
        self.exercised.append(text)

    def lines(self) -> list[str]:
        out = [f"rehearsal of {self.source.where} in {self.workdir}"]
        out += ["substituted:"] + [f"  - {s}" for s in self.substituted]
        out += ["exercised:"] + [f"  - {s}" for s in self.exercised]
        out += ["not rehearsed:"] + [f"  - {s}" for s in self.not_rehearsed or ["nothing"]]
        return out
