"""Reward functions by name: built-ins registered here, user code as `package.module:function`.

Every reward follows TRL's convention `f(prompts, completions, **columns) -> list[float | None]`. `guarded` wraps
one so that a failure names the function and the sample it failed on instead of surfacing as a bare traceback
from inside the trainer (or, worse, as a silent zero or NaN).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reward_models.errors import RewardError, closest, unknown_key

_SPEC_KEYS = ("name", "weight", "kwargs")
_TRAINER_ARGS = ("prompts", "completions")


@dataclass(frozen=True)
class RewardInfo:
    """What a reward declares about itself, next to its `@register`: what trainers, validation, the memory plan and
    `--rehearse` need to know without calling it (one source for all of them).

    - `columns`: dataset columns it always reads (TRL passes every column as a keyword argument, so a missing one
      would only show at the first reward call, after generation);
    - `column_options`: its options whose value names a column it reads (the function's default when the recipe
      leaves the option out; None: no column);
    - `model_option`: the option naming a model it loads (the memory plan counts it; a rehearsal builds a tiny
      stand-in there), `stand_in`: `f(model, tokenizer)` preparing a tiny random model to stand in (e.g. POLAR's
      special tokens);
    - `service_option`: the option naming a server it calls (a rehearsal says it must be up).
    """

    name: str
    func: Callable
    columns: tuple[str, ...] = ()
    column_options: tuple[str, ...] = ()
    model_option: str | None = None
    stand_in: Callable[[Any, Any], Any] | None = None
    service_option: str | None = None

    def reads(self, kwargs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The dataset columns this reward reads with the recipe's `kwargs`."""
        kwargs = kwargs or {}
        named = []
        for option in self.column_options:
            value = kwargs[option] if option in kwargs else _default(self.func, option)
            if value:
                named.append(str(value))
        return tuple(dict.fromkeys((*self.columns, *named)))

    def model(self, kwargs: Mapping[str, Any] | None) -> str | None:
        """The model this reward loads with the recipe's `kwargs` (None: it loads none)."""
        value = (kwargs or {}).get(self.model_option) if self.model_option else None
        return None if value is None else str(value)


_BUILTINS: dict[str, RewardInfo] = {}


def register(
    name: str,
    *,
    columns: tuple[str, ...] = (),
    column_options: tuple[str, ...] = (),
    model_option: str | None = None,
    stand_in: Callable[[Any, Any], Any] | None = None,
    service_option: str | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: make `func` available as the built-in reward `name`, with what it reads declared (`RewardInfo`)."""

    def wrap(func: Callable) -> Callable:
        old = _BUILTINS.get(name)
        # Same qualified name is a module reload, not a clash.
        if old is not None and (old.func.__module__, old.func.__qualname__) != (func.__module__, func.__qualname__):
            raise RewardError(f"reward '{name}' is already registered by {old.func.__module__}.{old.func.__qualname__}")
        _BUILTINS[name] = RewardInfo(name, func, tuple(columns), tuple(column_options), model_option, stand_in,
                                     service_option)  # fmt: skip
        return func

    return wrap


def reward_names() -> list[str]:
    """Names of the built-in rewards, sorted."""
    return sorted(_BUILTINS)


def resolve_reward(name: str) -> Callable:
    """A built-in reward by name, or user code given as `package.module:function`."""
    return reward_info(name).func


def reward_info(name: str) -> RewardInfo:
    """What reward `name` declares. User code (`package.module:function`) declares nothing: it reads the columns its
    signature requires (named parameters without a default, besides prompts and completions)."""
    if ":" in name:
        func = _import_reward(name)
        return RewardInfo(name, func, columns=_required_params(func))
    if name not in _BUILTINS:
        # The hint shares the parenthesis with the list of names: "(did you mean 'x'? built-in rewards: ...)".
        close = closest(name, _BUILTINS)
        hint = f"did you mean '{close}'? " if close else ""
        raise RewardError(
            f"unknown reward '{name}' ({hint}built-in rewards: {', '.join(reward_names())}; "
            "user code: 'package.module:function')"
        )
    return _BUILTINS[name]


def reward_columns(name: str, kwargs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The dataset columns reward `name` reads with the recipe's `kwargs`."""
    return reward_info(name).reads(kwargs)


def _default(func: Callable, option: str) -> Any:
    try:
        parameter = inspect.signature(func).parameters.get(option)
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _required_params(func: Callable) -> tuple[str, ...]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds and p.default is p.empty and p.name not in _TRAINER_ARGS)


def _import_reward(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward '{name}': expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward '{name}': cannot import module '{module_name}' ({err})") from err
    except Exception as err:  # a user module that fails while importing (SyntaxError, NameError, ...)
        raise RewardError(
            f"reward '{name}': importing module '{module_name}' raised {type(err).__name__}: {err}"
        ) from err
    func: Any = module
    for part in attr.split("."):  # "module:Class.method" works too
        func = getattr(func, part, None)
    if func is None or not callable(func):
        raise RewardError(f"reward '{name}': module '{module_name}' has no callable '{attr}'")
    return func


def text_of(item: Any) -> str:
    """A prompt or completion as text: strings as-is, TRL's conversational form as its last message's content."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], Mapping):
        content = item[-1].get("content", "")
        if isinstance(content, list):  # multimodal content parts: keep the text ones
            return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        return str(content)
    return str(item)


def _short(value: Any, limit: int = 200) -> str:
    text = text_of(value)
    return text if len(text) <= limit else text[:limit] + "…"


def guarded(func: Callable, name: str) -> Callable:
    """Wrap a reward so errors name it and the offending sample, and its scores are checked (length, NaN)."""
    return AsyncGuardedReward(func, name) if _is_async(func) else GuardedReward(func, name)


def _is_async(func: Callable) -> bool:
    # As TRL's is_async_callable, seeing through our own bound wrapper and functools.partial.
    while isinstance(func, (BoundReward, functools.partial)):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def as_text(items: Sequence) -> Sequence:
    """Rewards score text. TRL hands conversational prompts and completions over as message lists: a prompt becomes
    its last user turn's text (the question), a completion its assistant text."""
    if not items or not isinstance(items[0], list):
        return items

    def text(messages: list) -> str:
        if any(m.get("role") == "assistant" for m in messages):
            return "".join(m.get("content") or "" for m in messages if m.get("role") == "assistant")
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        return users[-1] if users else (messages[-1].get("content") or "" if messages else "")

    return [text(m) if isinstance(m, list) else m for m in items]


class GuardedReward:
    """A reward returned by `guarded`. A class rather than a closure so it pickles when `func` does; TRL logs it
    under `__name__`."""

    def __init__(self, func: Callable, name: str):
        self.func = func
        self.__name__ = self.__qualname__ = name
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float | None]:
        prompts, completions = as_text(prompts), as_text(completions)
        try:
            scores = self.func(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise  # already written for the user (e.g. a missing 'answer' column)
        except Exception as err:
            # Error path only: re-score one sample at a time to point at the one that breaks.
            index = None
            for i in range(len(completions)):
                try:
                    self.func(**_one_sample(i, prompts, completions, kwargs))
                except Exception:
                    index = i
                    break
            raise RewardError(_describe_failure(self.__name__, err, index, prompts, completions, kwargs)) from err
        return _check(self.__name__, scores, completions)


class AsyncGuardedReward(GuardedReward):
    """`GuardedReward` for an async reward; TRL awaits these concurrently."""

    async def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float | None]:
        try:
            scores = await self.func(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as err:
            index = None
            for i in range(len(completions)):
                try:
                    await self.func(**_one_sample(i, prompts, completions, kwargs))
                except Exception:
                    index = i
                    break
            raise RewardError(_describe_failure(self.__name__, err, index, prompts, completions, kwargs)) from err
        return _check(self.__name__, scores, completions)


def _one_sample(i: int, prompts: Sequence, completions: Sequence, kwargs: dict) -> dict[str, Any]:
    # Columns are lists aligned with completions; TRL's extras (trainer_state, log_metric, ...) pass through whole.
    n = len(completions)
    one = {k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
    return {"prompts": [prompts[i]], "completions": [completions[i]], **one}


def _describe_failure(
    name: str, err: Exception, index: int | None, prompts: Sequence, completions: Sequence, kwargs: dict
) -> str:
    head = f"reward '{name}' raised {type(err).__name__}: {err}"
    if index is None:
        return head + f" (on the batch of {len(completions)}; no single sample fails alone)"
    lines = [head, f"  on sample {index}:", f"    prompt: {_short(prompts[index])!r}",
             f"    completion: {_short(completions[index])!r}"]  # fmt: skip
    answer = kwargs.get("answer")
    if isinstance(answer, list) and index < len(answer):
        lines.append(f"    answer: {_short(answer[index])!r}")
    return "\n".join(lines)


def _check(name: str, scores: Any, completions: Sequence) -> list[float | None]:
    expected = len(completions)
    # Any sized iterable (list, tuple, numpy array, 1-d tensor), but not a string or a mapping.
    if isinstance(scores, (str, bytes, Mapping)) or not hasattr(scores, "__len__") or not hasattr(scores, "__iter__"):
        raise RewardError(f"reward '{name}' returned {type(scores).__name__}; expected a list of {expected} floats")
    if len(scores) != expected:
        raise RewardError(f"reward '{name}' returned {len(scores)} scores for {expected} completions")
    out: list[float | None] = []
    for i, score in enumerate(scores):
        if score is None:  # TRL's "this reward does not apply to this sample"
            out.append(None)
            continue
        try:
            value = float(score)
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward '{name}' returned {score!r} for sample {i}; expected a number") from err
        # inf is rejected too: one infinite reward turns the group's normalized advantages into NaN.
        if not math.isfinite(value):
            raise RewardError(
                f"reward '{name}' returned {value} for sample {i} (completion {_short(completions[i])!r}); "
                "return None to skip a sample"
            )
        out.append(value)
    return out


class BoundReward:
    """`func` with recipe kwargs bound: functools.partial, but named, and refusing to let a column override them."""

    def __init__(self, func: Callable, bound: dict[str, Any], name: str):
        self.func, self.bound = func, bound
        self.__name__ = self.__qualname__ = name
        self.__doc__ = func.__doc__

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> Any:
        clash = sorted(set(self.bound) & set(kwargs))
        if clash:
            raise RewardError(
                f"reward '{self.__name__}': kwargs {clash} set in the recipe are also dataset columns; rename one"
            )
        return self.func(prompts=prompts, completions=completions, **self.bound, **kwargs)


def _check_bound_kwargs(func: Callable, bound: dict[str, Any], name: str, where: str) -> None:
    # Built-ins take **kwargs (TRL passes every dataset column), so a misspelt option would otherwise be swallowed.
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return  # no introspectable signature (some C callables): trust the user
    named = [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    takes_any = any(v.kind is v.VAR_KEYWORD for v in params.values())
    for key in bound:
        if key in ("prompts", "completions"):
            raise RewardError(f"{where}: 'kwargs' cannot set '{key}'; the trainer passes it")
        if key in named or (takes_any and ":" in name):  # user code with **kwargs may read anything
            continue
        options = [p for p in named if p not in ("prompts", "completions")]
        raise RewardError(f"{where}: {unknown_key(key, options, f'reward {name!r}', noun='option')}")


def build_rewards(specs: list[dict[str, Any]]) -> tuple[list[Callable], list[float]]:
    """Guarded reward functions (kwargs bound) and their weights from `[{name, weight, kwargs}, ...]`."""
    funcs, weights = [], []
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        if not isinstance(spec, Mapping):
            raise RewardError(f"{where}: expected a mapping with 'name' (and optional 'weight', 'kwargs')")
        for key in spec:
            if key not in _SPEC_KEYS:
                raise RewardError(f"{where}: {unknown_key(key, _SPEC_KEYS)}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise RewardError(f"{where}: missing 'name' (a built-in reward or 'package.module:function')")
        where = f"rewards[{i}] ({name})"
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardError(f"{where}: 'weight' must be a number, got {weight!r}")
        bound = spec.get("kwargs") or {}
        if not isinstance(bound, Mapping):
            raise RewardError(f"{where}: 'kwargs' must be a mapping, got {type(bound).__name__}")
        try:
            func = resolve_reward(name)
        except RewardError as err:
            raise RewardError(f"rewards[{i}]: {err}") from err
        if bound:
            _check_bound_kwargs(func, dict(bound), name, where)
            func = BoundReward(func, dict(bound), name)
        funcs.append(guarded(func, name))
        weights.append(float(weight))
    return funcs, weights
