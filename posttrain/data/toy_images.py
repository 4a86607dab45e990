"""The coloured-squares task: a text-to-image preference problem small enough to learn on a CPU.

Prompts are "red", "green" or "blue"; an image is a square of random size and position on a grey background.
The winner draws the square in the saturated prompt colour, the loser in a dull one (the same hue, mostly grey).
`saturation_reward` (from `reward_models.image`, re-exported here) scores how strongly an image shows the prompt's
colour, analytically: it is ~1.0 for a winner, ~0.25 for a loser and 0 for a blank grey image, so "did training
move samples toward the winners" is a number.
"""

from __future__ import annotations

import random

import torch

from posttrain.data.schemas import ImageRow
from reward_models.image import COLORS, TOP_FRACTION, saturation_reward

__all__ = [
    "COLORS",
    "DULL",
    "GREY",
    "TOP_FRACTION",
    "draw_square",
    "saturation_reward",
    "toy_color_rows",
    "toy_pretrain_rows",
]

GREY = 0.5
DULL = 0.25  # a dull square's colour is GREY + DULL * (onehot - GREY): chroma 0.25 against the winner's 1.0


def draw_square(color: str, saturated: bool, resolution: int, rng: random.Random) -> torch.Tensor:
    """A (3, R, R) image in [-1, 1]: grey background, one square of side R*3/8..R*3/4 at a random position."""
    onehot = torch.zeros(3)
    onehot[COLORS.index(color)] = 1.0
    rgb = onehot if saturated else GREY + DULL * (onehot - GREY)
    image = torch.full((3, resolution, resolution), GREY)
    side = rng.randint(max(1, 3 * resolution // 8), max(1, 3 * resolution // 4))
    top, left = rng.randint(0, resolution - side), rng.randint(0, resolution - side)
    image[:, top : top + side, left : left + side] = rgb.view(3, 1, 1)
    return image * 2.0 - 1.0


def toy_color_rows(n: int, seed: int = 0, resolution: int | None = 16) -> list[ImageRow]:
    """`n` preference rows: prompt colour, saturated winner, dull loser (independent square geometry)."""
    rng = random.Random(seed)
    resolution = resolution or 16
    rows = []
    for i in range(n):
        color = rng.choice(COLORS)
        winner = draw_square(color, True, resolution, rng)
        loser = draw_square(color, False, resolution, rng)
        rows.append(ImageRow(color, winner, loser, f"toy_colors: row {i + 1}"))
    return rows


def toy_pretrain_rows(n: int, win_fraction: float = 0.3, seed: int = 0, resolution: int = 16) -> list[ImageRow]:
    """Rows for pretraining a base model that mostly draws dull squares (`win_fraction` of them saturated)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color = rng.choice(COLORS)
        rows.append(ImageRow(color, draw_square(color, rng.random() < win_fraction, resolution, rng), None, f"row {i}"))
    return rows
