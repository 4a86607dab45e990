"""Reward functions and models usable with or without posttrain's trainers."""

from reward_models import code_exec as _code_exec  # noqa: F401  (registers built-ins)
from reward_models import format as _format  # noqa: F401
from reward_models import math as _math  # noqa: F401
from reward_models import polar as _polar  # noqa: F401
from reward_models import remote as _remote  # noqa: F401
from reward_models import sequence_classifier as _sequence_classifier  # noqa: F401
from reward_models.registry import (
    RewardInfo,
    build_rewards,
    guarded,
    register,
    resolve_reward,
    reward_columns,
    reward_info,
    reward_names,
)

__all__ = [
    "RewardInfo",
    "build_rewards",
    "guarded",
    "register",
    "resolve_reward",
    "reward_columns",
    "reward_info",
    "reward_names",
]
