"""SePPO's reference-model pool: frozen snapshots [theta_0, theta_1, ...] of the policy, one appended per stage.

At the start of stage k the reference is drawn from the pool: `uniform` (the paper's choice, any past checkpoint
equally likely), `initial` (always theta_0: the fixed reference of Diffusion-DPO) or `latest` (the previous stage's
policy, as in self-play). A draw depends only on (seed, stage), so a resumed run draws the same references.

Entries are independent copies (cloned tensors, never views of the live parameters) stored on the CPU, optionally
in a lower precision (`dtype`), so the pool costs host memory, not GPU memory; only the one drawn entry is copied
into the reference UNet. With a `directory`, every entry is also written there as entry-<k>.safetensors when it is
appended (append-only, so checkpoints don't duplicate it) and `restore` rebuilds the pool from those files.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from posttrain.trainers.seppo_variants import Draw

DRAWS: tuple[str, ...] = ("uniform", "initial", "latest")


class ReferencePool:
    def __init__(self, directory: str | Path | None = None, dtype: torch.dtype | None = None, keep_in_memory=True):
        self.directory = Path(directory) if directory is not None else None
        self.dtype = dtype
        self.keep_in_memory = keep_in_memory or self.directory is None
        self.entries: list[dict[str, torch.Tensor] | None] = []

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, model: torch.nn.Module) -> int:
        """Snapshot `model`'s current weights as a new entry (a copy on the CPU); returns its index."""
        snapshot = {}
        for name, tensor in model.state_dict().items():
            value = tensor.detach().to("cpu", copy=True)
            if self.dtype is not None and value.is_floating_point():
                value = value.to(self.dtype)
            snapshot[name] = value.clone()  # clone: never share storage with the live parameter, even on CPU
        index = len(self.entries)
        if self.directory is not None:
            from safetensors.torch import save_file

            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f"entry-{index}.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in snapshot.items()}, str(tmp))
            tmp.replace(self.directory / f"entry-{index}.safetensors")
        self.entries.append(snapshot if self.keep_in_memory else None)
        return index

    def entry(self, index: int) -> dict[str, torch.Tensor]:
        stored = self.entries[index]
        if stored is not None:
            return stored
        from safetensors.torch import load_file

        return load_file(str(self._path(index)))

    def draw(self, mode: Draw, seed: int, stage: int) -> int:
        """The pool index to use as reference in `stage` (deterministic in seed and stage)."""
        if not self.entries:
            raise RuntimeError("the reference pool is empty: append the initial model first")
        if mode == "initial":
            return 0
        if mode == "latest":
            return len(self.entries) - 1
        if mode == "uniform":
            return random.Random(f"seppo-pool:{seed}:{stage}").randrange(len(self.entries))
        raise ValueError(f"reference draw must be one of {', '.join(DRAWS)}, got {mode!r}")

    def load_into(self, index: int, model: torch.nn.Module) -> torch.nn.Module:
        """Copy entry `index` into `model` (the reference UNet) and freeze it."""
        model.load_state_dict(self.entry(index))
        model.requires_grad_(False)
        model.eval()
        return model

    def restore(self, count: int) -> None:
        """Rebuild the first `count` entries from `directory` (resume)."""
        if self.directory is None:
            raise RuntimeError("a pool without a directory cannot be restored")
        from safetensors.torch import load_file

        missing = [str(self._path(i)) for i in range(count) if not self._path(i).exists()]
        if missing:
            raise FileNotFoundError(f"reference pool entries missing: {', '.join(missing)}")
        self.entries = [load_file(str(self._path(i))) if self.keep_in_memory else None for i in range(count)]

    def _path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"entry-{index}.safetensors"
