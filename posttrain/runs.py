"""The run dir contract: `runs/<name>/` holds everything one recipe run produced.

recipe.resolved.yaml     the recipe with every default filled in (`posttrain train` it to reproduce)
metrics.jsonl            one JSON object per log step: step, stage, and the metrics as TRL logs them; after a
                         resume each step appears once (rows the resumed checkpoint does not cover are moved out)
metrics.superseded.jsonl rows logged after the checkpoint a run was resumed from (by the attempt that died), each
                         with `superseded: {resumed_from, time}`; never read by curves or reports
checkpoints/             Trainer checkpoints; each complete one carries a `.complete` marker that lists its files
                         and their sizes, so a checkpoint torn later (rotation, a full disk) is recognised
final/                   the trained model + tokenizer (from_pretrained-loadable), with `posttrain_final.json`
                         (the step it was saved at) and README.md (its Hub model card, `posttrain.model_card`)
eval/<name>.json         held-out results before/after training, with per-sample outputs
mixture.json             a mixed data.train's sources with their requested and realised shares
report.md, *.png         curves and tables
.run_nonce               only while a multi-process run starts: global rank 0's nonce, which every rank must read
                         back (`posttrain.models.processes.confirm_shared_run_dir`); removed once all have

Who writes what under a multi-process (multi-node) launch, into the one run dir every node must share
(docs/scaling.md): global rank 0 alone writes recipe.resolved.yaml, base_model/ (model.tiny), metrics.jsonl, eval/,
mixture.json, report.md, each checkpoint's model weights, trainer state and `.complete` marker (after every rank has
saved), and final/ (gathered from every rank under ZeRO-3). Every rank writes its own `rng_state_<rank>.pth` into
each checkpoint and, under DeepSpeed, its own ZeRO partitions (`global_step<n>/zero_pp_rank_<rank>_*`). A node's
local rank 0 writes nothing of the run.

States (`RunDir.state`), decided before a run starts: `new` (nothing of a run there), `failed` (files of a run but
no complete checkpoint and no final/: restarted from scratch, the old files moved aside to `<dir>.failed-<time>/`),
`interrupted` (a complete checkpoint, no final/ of the planned length: `--resume` continues it), `finished` (final/
at or past the planned steps: `--resume` says so and changes nothing).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.recipe import Recipe, to_yaml

COMPLETE_MARKER = ".complete"
FINAL_INFO = "posttrain_final.json"  # in final/: the step the model was saved at
SUPERSEDED = "metrics.superseded.jsonl"
RUN_NONCE = ".run_nonce"  # written by global rank 0 at start, read back by every rank (the run dir is shared)
MIXTURE_FILE = "mixture.json"  # a mixed data.train: each source's requested and realised share (data/mixture.py)
# Multi-turn tool rollouts (posttrain.trainers.tool_rollouts): the latest rewarded / unrewarded transcript, and each
# tool failure with its sample (one JSON line each).
TOOL_TRANSCRIPTS_FILE = "tool_transcripts.json"
TOOL_FAILURES_FILE = "tool_failures.jsonl"
# Weight files of a checkpoint that predates the file manifest in `.complete` (Trainer, PEFT, DeepSpeed, accelerate).
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors",
            "adapter_model.bin")  # fmt: skip


@dataclass
class RunState:
    """What a run dir holds, read before a run starts (`RunDir.state`)."""

    kind: str  # new | failed | interrupted | finished
    checkpoint: Path | None = None  # the newest checkpoint whose files are all there
    final_step: int | None = None  # the step final/ was saved at (None: no final/, or one from before it was recorded)
    skipped: list[str] = field(default_factory=list)  # torn checkpoints, each with why


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

    def state(self, planned_steps: int | None = None) -> RunState:
        """The dir's state (module docstring). `planned_steps` is the recipe's length (None when it is counted in
        epochs): final/ saved before it (a run being extended to more steps) does not make the run finished."""
        checkpoint, skipped = self._newest_whole_checkpoint()
        final_step = self.final_step()
        if self.final.is_dir() and (final_step is None or planned_steps is None or final_step >= planned_steps):
            return RunState("finished", checkpoint, final_step, skipped)
        if checkpoint is not None:
            return RunState("interrupted", checkpoint, final_step, skipped)
        if self.final.is_dir():  # short of a longer plan, with no checkpoint left to continue from
            return RunState("finished", None, final_step, skipped)
        if any(p.exists() for p in (self.metrics_path, self.checkpoints)):
            return RunState("failed", None, final_step, skipped)
        return RunState("new", None, final_step, skipped)

    def check(self, state: RunState, resume: bool, planned_steps: int | None = None) -> None:
        """Refuse what `state` does not allow (every process raises the same error): continuing an interrupted or
        finished run without --resume, --resume with nothing to continue."""
        if state.kind == "finished":
            step = f" at step {state.final_step}" if state.final_step is not None else ""
            if not resume:
                raise PosttrainError(
                    f"{self.path} already holds a finished run (final/{step}). Choose another output dir with "
                    f"--set output_dir=..., or raise the step count and pass --resume (nothing was overwritten)"
                )
            if planned_steps is not None and state.final_step is not None and state.final_step < planned_steps:
                raise PosttrainError(
                    f"--resume: {self.path} has final/ at step {state.final_step} but no complete checkpoint to "
                    f"continue it to step {planned_steps} from (nothing was changed)"
                )
        if state.kind == "interrupted" and not resume:
            raise PosttrainError(
                f"{self.path} already holds a run (last complete checkpoint: {state.checkpoint.name}). Pass --resume "
                f"to continue it, or choose another output dir with --set output_dir=... (nothing was overwritten)"
            )
        if state.kind == "new" and resume:
            raise PosttrainError(
                f"--resume: no complete checkpoint under {self.checkpoints}: there is no run to continue (run "
                f"without --resume to start one)"
            )

    def prepare(
        self,
        recipe: Recipe,
        resume: bool,
        planned_steps: int | None = None,
        state: RunState | None = None,
        is_main: bool = True,
    ) -> RunState:
        """Settle the dir before a run. `state` is what every process read before any of them changed the dir
        (read now when not given); what it does not allow is refused on every process (`check`). Then, on the main
        process only: a failed run's files are moved aside, a resumed run's metrics past its checkpoint moved out
        and torn checkpoints newer than it renamed `torn-checkpoint-<n>`, and the resolved recipe written. A
        finished run (resumed) is left exactly as it is."""
        state = state or self.state(planned_steps)
        self.check(state, resume, planned_steps)
        if not is_main or state.kind == "finished":
            return state
        for why in state.skipped:
            print(f"warning: {why}", file=sys.stderr)
        if state.kind == "failed":
            aside = self.move_aside()
            print(f"{self.path}: the run there failed before its first complete checkpoint; starting it again from "
                  f"scratch (its files were moved to {aside})", file=sys.stderr)  # fmt: skip
        if state.kind == "interrupted":
            resumed_from = checkpoint_step(state.checkpoint)
            for child in list(self.checkpoints.iterdir()):
                match = re.fullmatch(r"checkpoint-(\d+)", child.name)
                if match and int(match.group(1)) > resumed_from:  # torn (else it would be the one resumed)
                    target, n = child.with_name(f"torn-{child.name}"), 1
                    while target.exists():
                        n += 1
                        target = child.with_name(f"torn-{child.name}-{n}")
                    child.rename(target)
            moved = self.supersede_metrics_after(resumed_from)
            if moved:
                print(f"{self.path}: {moved} metrics rows logged after {state.checkpoint.name} moved to {SUPERSEDED}",
                      file=sys.stderr)  # fmt: skip
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / "recipe.resolved.yaml", to_yaml(recipe))
        return state

    def move_aside(self) -> Path:
        """Move everything in the dir to a new sibling `<dir>.failed-<UTC time>[-n]/` (nothing is deleted)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.failed-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.failed-{stamp}-{n}")
        aside.mkdir(parents=True)
        for child in sorted(self.path.iterdir()):
            child.rename(aside / child.name)
        return aside

    def supersede_metrics_after(self, step: int) -> int:
        """Move the rows logged after `step` (by the attempt that died after that checkpoint) from metrics.jsonl
        to metrics.superseded.jsonl, so each step appears once; returns how many moved. metrics.jsonl is rewritten
        atomically, the side file appended first (a kill in between duplicates rows there, never loses any)."""
        if not self.metrics_path.exists():
            return 0
        keep, moved = [], []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            (moved if isinstance(row.get("step"), int) and row["step"] > step else keep).append(row)
        if not moved:
            return 0
        mark = {"resumed_from": step, "time": round(time.time(), 3)}
        with (self.path / SUPERSEDED).open("a") as fh:
            fh.writelines(json.dumps({**row, "superseded": mark}) + "\n" for row in moved)
        write_atomic(self.metrics_path, "".join(json.dumps(row) + "\n" for row in keep))
        return len(moved)

    def final_step(self) -> int | None:
        try:
            return int(json.loads((self.final / FINAL_INFO).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
        """The newest checkpoint that finished writing and still has all its files (a process killed mid-save
        leaves no marker; a file lost since, e.g. in rotation, is noticed through the marker's manifest)."""
        return self._newest_whole_checkpoint()[0]

    def _newest_whole_checkpoint(self) -> tuple[Path | None, list[str]]:
        """The newest whole checkpoint, and a line for each newer one skipped (which and why)."""
        if not self.checkpoints.is_dir():
            return None, []
        found = []
        for child in self.checkpoints.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        skipped = []
        for _, child in sorted(found, reverse=True):
            problem = checkpoint_problem(child)
            if problem is None:
                return child, skipped
            skipped.append(f"skipping {child}: {problem}")
        return None, skipped

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


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def mark_complete(checkpoint: Path) -> None:
    """Write the `.complete` marker of a fully written checkpoint: the time and every file with its size."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER}  # fmt: skip
    write_atomic(checkpoint / COMPLETE_MARKER, json.dumps({"time": round(time.time(), 3), "files": files}))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` can't be resumed from (None when it can): no marker (its save never finished), or a file
    its marker lists is missing or has another size. A marker from before the manifest (a bare timestamp) only
    vouches for the save having finished, so the weights are looked for."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return "no .complete marker (its save did not finish)"
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        bad = [name for name, size in manifest["files"].items()
               if not (checkpoint / name).is_file() or (checkpoint / name).stat().st_size != size]  # fmt: skip
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            return f"{len(bad)} of the files its .complete marker lists are missing or changed size ({shown})"
        return None
    if not any((checkpoint / name).exists() for name in _WEIGHTS) and not any(checkpoint.glob("global_step*")):
        return "its weights are missing"
    return None


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


def loadable_model_dir(final: Path) -> bool:
    """A Hugging Face model dir (config + weights, whole, sharded or a LoRA adapter), or a diffusion stack whose
    unet/ diffusers loads (a pipeline dir has model_index.json; the pixel-space toy stack has none)."""
    if (final / "model_index.json").is_file() or (final / "unet").is_dir():
        unet = final / "unet"
        weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                   "diffusion_pytorch_model.bin")  # fmt: skip
        return (unet / "config.json").is_file() and any((unet / name).is_file() for name in weights)
    if (final / "adapter_config.json").is_file():  # a LoRA run's final/: the adapter (peft's from_pretrained)
        return any((final / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin"))
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (final / "config.json").is_file() and any((final / name).is_file() for name in weights)


def training_losses(run: RunDir) -> dict[int, list[float]]:
    """step -> the training losses logged at it (a resume that started over would log step 1 twice)."""
    seen: dict[int, list[float]] = {}
    for row in run.read_metrics():
        if "loss" in row and "step" in row and ":" not in str(row.get("stage", "")):
            seen.setdefault(int(row["step"]), []).append(float(row["loss"]))
    return seen
