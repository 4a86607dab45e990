"""User-facing errors and name suggestions: the ground floor, imported by every layer.

Each error names the file, key, row or function the user has to fix. `RewardError` and `ModelError` are
`reward_models`' own (it imports nothing from posttrain); `PosttrainError` is their common base, so the CLI's
`except PosttrainError` reports every one of them without a traceback.
"""

from reward_models.errors import ModelError, RewardError, suggest, unknown_key
from reward_models.errors import UserError as PosttrainError

__all__ = ["PosttrainError", "RecipeError", "DataError", "ModelError", "RewardError", "suggest", "unknown_key"]


class RecipeError(PosttrainError):
    """A recipe file or --set override is invalid (unknown key, wrong type, missing value)."""


class DataError(PosttrainError):
    """A data source can't be read or a row doesn't fit its schema."""
