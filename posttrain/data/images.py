"""Image data for text-to-image post-training: Pick-a-Pic style preference pairs and prompt+image sets.

Sources (a recipe's `data.train` for `trainer: seppo`):
- `{path: pairs.parquet | pairs.jsonl, format: pickapic}`: columns caption, jpg_0, jpg_1, label_0 (Pick-a-Pic v2).
  The winner is jpg_0 when label_0 == 1, else jpg_1; ties (label_0 == 0.5) are dropped.
- `{path: dir/ | images.jsonl, format: prompt_images}`: a folder of images each with a same-stem .txt caption, or
  jsonl/parquet rows with `prompt` (or `caption`) and `image`. Winners only: the SePPO setting.
- `{synthetic: toy_colors, n: 512, seed: 0}`: the coloured-squares task (posttrain.data.toy_images).

An image cell may hold raw bytes, a `{bytes, path}` mapping (datasets' Image feature) or a path (relative to the
data file). Images are decoded lazily; one that can't be read raises a DataError naming the file, row and column.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.data.schemas import ImageRow
from posttrain.errors import DataError, unknown_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FORMATS = ("pickapic", "prompt_images")
SOURCE_KEYS = ("path", "format", "synthetic", "n", "seed", "limit", "resolution")


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side to `resolution`, crop a square (center or random), maybe flip, scale to [-1, 1]."""

    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, image: Any, rng: random.Random | None = None) -> torch.Tensor:
        from PIL import Image

        rng = rng or random.Random()
        image = image.convert("RGB")
        w, h = image.size
        scale = self.resolution / min(w, h)
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        w, h = image.size
        if self.center_crop:
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        else:
            left, top = rng.randint(0, w - self.resolution), rng.randint(0, h - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def decode_image(cell: Any, base_dir: Path | None, where: str):
    """A PIL image from bytes, a {bytes, path} mapping or a path; DataError naming `where` otherwise."""
    from PIL import Image

    source = "bytes"
    try:
        if isinstance(cell, Mapping):
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(cell)))
        elif isinstance(cell, (str, Path)):
            path = Path(cell)
            path = path if path.is_absolute() or base_dir is None else base_dir / path
            source = str(path)
            image = Image.open(path)
        else:
            raise TypeError(f"expected image bytes or a path, got {type(cell).__name__}")
        image.load()
        return image
    except Exception as err:
        raise DataError(f"{where}: could not read the image ({source}): {err}") from err


def load_image_rows(spec: Mapping[str, Any], *, base_dir: Path | None = None, origin: str = "data") -> list[ImageRow]:
    """Rows of one image source (see the module docstring), images not yet decoded."""
    if "mix" in spec:
        raise DataError(f"{origin}: a list of image sources (a mixture) is not supported; give one source")
    unknown = [k for k in spec if k not in SOURCE_KEYS]
    if unknown:
        raise DataError(f"{origin}: {unknown_key(unknown[0], SOURCE_KEYS, 'an image source')}")
    if "synthetic" in spec:
        from posttrain.data.toy_images import toy_color_rows

        if spec["synthetic"] != "toy_colors":
            raise DataError(f"{origin}: unknown synthetic image task '{spec['synthetic']}' (known: toy_colors)")
        rows = toy_color_rows(int(spec.get("n", 512)), seed=int(spec.get("seed", 0)), resolution=spec.get("resolution"))
    else:
        if "path" not in spec:
            raise DataError(f"{origin}: an image source needs 'path' or 'synthetic'")
        path = resolve_data_path(spec["path"], base_dir)
        fmt = spec.get("format", "pickapic")
        if fmt not in FORMATS:
            raise DataError(f"{origin}: unknown image format '{fmt}' (formats: {', '.join(FORMATS)})")
        if not path.exists():
            raise DataError(f"{origin}: {path} not found")
        rows = load_pickapic(path) if fmt == "pickapic" else load_prompt_images(path)
    if spec.get("limit") is not None:
        rows = rows[: int(spec["limit"])]
    if not rows:
        raise DataError(f"{origin}: the image source has no usable rows")
    return rows


def resolve_data_path(path: str, base_dir: Path | None) -> Path:
    """Relative to the recipe's folder if it exists there, else to the working dir (as text sources resolve)."""
    candidate = Path(path).expanduser()
    if base_dir is not None and not candidate.is_absolute() and (base_dir / candidate).exists():
        return base_dir / candidate
    return candidate


def describe_image_source(spec: Mapping[str, Any], *, base_dir: Path | None = None, origin: str = "data") -> str:
    """One line for `--dry-run`: how many rows an image source has and whether it holds pairs (images not decoded)."""
    if spec.get("path") is not None and not resolve_data_path(spec["path"], base_dir).exists():
        return f"{spec['path']} (not there yet)"
    rows = load_image_rows(spec, base_dir=base_dir, origin=origin)
    pairs = sum(r.loser is not None for r in rows)
    kind = "preference pairs (winner, loser)" if pairs == len(rows) else "prompt + winning image rows"
    return f"{len(rows)} {kind}"


def _read_table(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {i} is not valid JSON: {err}") from err
    return rows


def load_pickapic(path: Path) -> list[ImageRow]:
    """Pick-a-Pic rows → (caption, winner, loser); winner = jpg_0 if label_0 == 1 else jpg_1; ties dropped."""
    table = _read_table(path)
    rows = []
    for i, row in enumerate(table, start=1):
        missing = [c for c in ("caption", "jpg_0", "jpg_1", "label_0") if c not in row]
        if missing:
            raise DataError(f"{path}: row {i} lacks column(s) {', '.join(missing)} (Pick-a-Pic format)")
        label = float(row["label_0"])
        if label == 0.5:
            continue
        if label not in (0.0, 1.0):
            raise DataError(f"{path}: row {i}: label_0 must be 0, 0.5 or 1, got {row['label_0']!r}")
        win, lose = ("jpg_0", "jpg_1") if label == 1.0 else ("jpg_1", "jpg_0")
        rows.append(
            ImageRow(str(row["caption"]), (path.parent, row[win]), (path.parent, row[lose]), f"{path}: row {i}")
        )
    return rows


def load_prompt_images(path: Path) -> list[ImageRow]:
    """A folder of images with same-stem .txt captions, or jsonl/parquet rows with prompt|caption and image."""
    if path.is_dir():
        rows = []
        for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image.with_suffix(".txt")
            if not caption.exists():
                raise DataError(f"{path}: image {image.name} has no caption file {caption.name}")
            rows.append(ImageRow(caption.read_text().strip(), (path, image.name), None, f"{image}"))
        return rows
    rows = []
    for i, row in enumerate(_read_table(path), start=1):
        prompt = row.get("prompt", row.get("caption"))
        if prompt is None or "image" not in row:
            raise DataError(f"{path}: row {i} needs 'prompt' (or 'caption') and 'image'")
        rows.append(ImageRow(str(prompt), (path.parent, row["image"]), None, f"{path}: row {i}"))
    return rows


def to_tensor(cell: Any, transform: ImageTransform, rng: random.Random, where: str) -> torch.Tensor:
    """Decode (if needed) and transform one image cell; tensors (synthetic images) pass through unchanged."""
    if isinstance(cell, torch.Tensor):
        return cell
    base_dir, value = cell if isinstance(cell, tuple) else (None, cell)
    return transform(decode_image(value, base_dir, where), rng)


class ImageRowDataset(torch.utils.data.Dataset):
    """`ImageRow`s as dicts {prompt, winner, loser?} of image tensors in [-1, 1], decoded on access."""

    def __init__(self, rows: list[ImageRow], transform: ImageTransform):
        self.rows = rows
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,)).item()))  # follows torch's seed, new per epoch
        # A pair shares the crop/flip draw, so a preference is never between two different crops of a scene.
        state = rng.getstate()
        item = {"prompt": row.prompt, "winner": to_tensor(row.winner, self.transform, rng, f"{row.where} (winner)")}
        if row.loser is not None:
            rng.setstate(state)
            item["loser"] = to_tensor(row.loser, self.transform, rng, f"{row.where} (loser)")
        return item


def collate_image_rows(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"prompt": [it["prompt"] for it in items], "winner": torch.stack([it["winner"] for it in items])}
    if all("loser" in it for it in items):
        batch["loser"] = torch.stack([it["loser"] for it in items])
    return batch
