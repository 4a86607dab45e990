"""User-facing errors. Each names the file, key, row or function the user has to fix."""


class PosttrainError(Exception):
    """Base class: the CLI prints these without a traceback."""


class RecipeError(PosttrainError):
    """A recipe file or --set override is invalid (unknown key, wrong type, missing value)."""


class DataError(PosttrainError):
    """A data source can't be read or a row doesn't fit its schema."""


class ModelError(PosttrainError):
    """A model or tokenizer can't be loaded."""


class RewardError(PosttrainError):
    """A reward function can't be resolved or raised while scoring."""
