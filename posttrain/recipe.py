"""Recipe files: YAML → a typed, validated `Recipe`, before any model or dataset is loaded.

A recipe is the whole experiment: trainer, model, data, rewards, rollout, algorithm and training options, eval and
output dir. `extends:` pulls shared defaults from another file (deep-merged; lists are replaced), and
`--set section.key=value` overrides are applied last. Sections and keys posttrain owns are dataclasses below;
`algorithm` and `training` depend on the trainer: `posttrain.registry.load_and_validate` checks them against the
trainer's own options dataclass and its library config (e.g. TRL's GRPOConfig), with `coerce` below, the one value
coercer every recipe value goes through. This module knows no trainer: it is the config floor, below everything.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.errors import RecipeError, unknown_key
from posttrain.recipe_yaml import deep_merge, read_recipe_yaml


@dataclass
class LoraOptions:
    """peft LoRA adapter; `null` (the default) trains all weights."""

    r: int = field(default=16, metadata={"ge": 1})
    alpha: int = field(default=32, metadata={"gt": 0})
    dropout: float = field(default=0.05, metadata={"ge": 0, "lt": 1})
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelSection:
    """The policy (or reward model) to start from: a local dir / hub id, or a tiny model built on the fly."""

    path: str | None = None
    tiny: dict[str, Any] | None = (
        None  # keyword args of posttrain.models.tiny.TinySpec (or TinyDiffusionSpec), e.g. {task: arithmetic}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: LoraOptions | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    trust_remote_code: bool = False


@dataclass
class MixtureOptions:
    """How a list of `data.train` sources is interleaved (posttrain.data.mixture); `seed` defaults to the recipe's."""

    stopping: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    seed: int | None = field(default=None, metadata={"ge": 0})


@dataclass
class DataSection:
    """Training and held-out data; each source is a dict understood by `posttrain.data.load_source`."""

    # One source, or a list to mix (each with a `weight`), kept as {"mix": [...], "stopping", "seed"} (a mapping).
    train: dict[str, Any] | list[dict[str, Any]] | None = None
    eval: dict[str, Any] | None = None
    mixture: MixtureOptions = field(default_factory=MixtureOptions)
    prompt_template: str | None = None  # Python format string over row columns, e.g. "Q: {prompt}\nA:"
    system_prompt: str | None = None
    # true: render prompts through the tokenizer's chat template; a name of one of TRL's bundled templates (qwen2_5,
    # llama3, ...) or a .jinja file: that template instead (the run's tokenizer and final/ carry it)
    chat_template: bool | str = False
    # verl's data.max_prompt_length: a prompt over this many tokens (as the model sees it, template included) is an
    # error naming its row, dropped (`filter`: verl's filter_overlong_prompts) or cut to its last tokens (`left`:
    # verl's truncation='left'); posttrain.data.templates.limit_prompt_length
    max_prompt_length: int | None = field(default=None, metadata={"ge": 1})
    overlong_prompts: Literal["error", "filter", "left"] = "error"


@dataclass
class RewardSpec:
    """One reward: a built-in name (see `posttrain rewards`) or `package.module:function`."""

    name: str
    weight: float = field(default=1.0, metadata={"finite": True})
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class VLLMOptions:
    """How TRL drives vLLM: `colocate` shares the training GPUs, `server` talks to `trl vllm-serve`."""

    mode: Literal["colocate", "server"] = "colocate"
    gpu_memory_utilization: float = field(default=0.3, metadata={"gt": 0, "le": 1})
    tensor_parallel_size: int = field(default=1, metadata={"ge": 1})
    server_host: str = "127.0.0.1"
    server_port: int = field(default=8000, metadata={"ge": 1, "le": 65535})


Backend = Literal["hf", "vllm"]  # rollout backends: transformers generate, vLLM
BACKENDS: tuple[str, ...] = typing.get_args(Backend)


@dataclass
class RolloutSection:
    """Sampling of completions during RL (and for RFT / POLAR data building)."""

    backend: Backend = "hf"
    num_generations: int = field(default=8, metadata={"ge": 2})  # a group of one has no relative advantage
    max_new_tokens: int = field(default=256, metadata={"ge": 1})
    temperature: float = field(default=1.0, metadata={"gt": 0})
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    top_k: int = field(default=0, metadata={"ge": 0})  # 0 disables top-k
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    tools: list[str] = field(default_factory=list)  # multi-turn rollouts (posttrain.rollout.tools): module:function
    environment: str | dict[str, str] | None = None  # module:Class, or {name: module:Class} picked by a row column
    max_tool_calls: int | None = field(default=None, metadata={"ge": 1})  # tool-calling rounds per rollout


@dataclass
class EvalSection:
    """Held-out evaluation run before/after training and every `every_steps` steps (greedy by default)."""

    data: dict[str, Any] | None = None  # a data source; defaults to data.eval
    name: str = "heldout"  # metrics are logged as eval/<name>/accuracy
    grader: str = "numeric_match"  # see posttrain.evaluation.graders: math_verify, numeric_match, gsm8k_strict, ...
    suite: str | None = None  # an eval/suites/*.yaml file run alongside the held-out set
    every_steps: int | None = field(default=None, metadata={"ge": 1})
    max_new_tokens: int | None = field(default=None, metadata={"ge": 1})  # defaults to rollout.max_new_tokens
    batch_size: int = field(default=256, metadata={"ge": 1})
    slice_column: str | None = None  # boolean/categorical column for per-slice accuracy (e.g. carry)
    limit: int | None = field(default=None, metadata={"ge": 1})  # cap on rows per benchmark (held-out and suite)
    tools: list[str] = field(default_factory=list)  # the held-out eval's tool loop, any trainer; else rollout.tools
    max_tool_calls: int | None = field(default=None, metadata={"ge": 1})  # else rollout.max_tool_calls


@dataclass
class CardSection:
    """What `final/README.md`, the run's Hub model card, says beyond what the run knows itself (its metadata)."""

    license: str | None = None  # a Hub license id, e.g. apache-2.0
    base_model: str | None = None  # defaults to model.path when that is a hub id
    datasets: list[str] = field(default_factory=list)  # hub dataset ids; data.train's path when that is one
    tags: list[str] = field(default_factory=list)  # added to posttrain's own (posttrain, the trainer's name)
    language: list[str] = field(default_factory=list)


class Settings(typing.Mapping[str, Any]):
    """Read-only `training:`/`algorithm:` values with their defaults, by key or attribute:
    `recipe.settings.per_device_train_batch_size`. A key no config of the trainer has is an AttributeError/KeyError
    (a typo in posttrain's code, not a recipe problem: validation refuses unknown recipe keys first)."""

    def __init__(self, values: typing.Mapping[str, Any]):
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_values"][key]
        except KeyError:
            raise AttributeError(f"no training/algorithm setting '{key}' for this trainer") from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"


@dataclass
class Recipe:
    """A validated experiment. `source` is the file it came from (for error messages and relative paths)."""

    trainer: str = ""  # checked against the registry by posttrain.registry.load_and_validate
    name: str = ""
    description: str = ""
    seed: int = field(default=0, metadata={"ge": 0})
    output_dir: str | None = None
    # The accelerate config this recipe is launched with (processes, ZeRO stage), relative to the recipe file:
    # `--dry-run`'s memory plan reads it; `accelerate launch --config_file` is still how it is launched.
    accelerate_config: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rewards: list[RewardSpec] = field(default_factory=list)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    eval: EvalSection = field(default_factory=EvalSection)
    card: CardSection = field(default_factory=CardSection)
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the merged YAML, for recipe.resolved.yaml
    overridden: set[str] = field(default_factory=set, repr=False)  # dotted keys set with --set (for errors)
    # Filled in by validation (posttrain.registry.validate_recipe): the trainer's options dataclass, built from
    # `algorithm:`, and every `training:`/`algorithm:` value the trainer's library config and posttrain's own
    # training keys take, the library's own defaults (read from its dataclass) under the recipe's values.
    options: Any = field(default=None, repr=False)
    settings: Settings = field(default_factory=lambda: Settings({}), repr=False)

    @property
    def where(self) -> str:
        return str(self.source) if self.source else "<recipe>"

    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def resolve_path(self, value: str) -> str:
        """A path relative to the recipe file if it exists there, else unchanged (CWD-relative or a hub id)."""
        if self.source is not None:
            candidate = self.source.parent / value
            if candidate.exists():
                return str(candidate)
        return value


_INTERNAL = ("source", "raw", "overridden", "options", "settings")

# ----------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None, problems: list | None = None) -> Recipe:
    """Read `path` (following `extends:`), apply `--set` overrides, validate the sections posttrain owns.

    The trainer-specific sections (`algorithm`, `training`) are left as read: callers that run a recipe use
    `posttrain.registry.load_and_validate`, which calls this and then checks them. A file that can't be read is
    one error at once; problems with values are collected into `problems` when given (the caller raises them all
    together), else raised together here.
    """
    path = Path(path)
    raw = _read_with_extends(path, seen=())
    overridden = apply_overrides(raw, overrides or [], where=str(path))
    return build_recipe(raw, source=path, overridden=overridden, problems=problems)


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise RecipeError(f"{path}: 'extends' cycle: {chain}")
    data = read_recipe_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: 'extends' must be a path to another recipe file")
    base = _read_with_extends(path.parent / parent, seen=(*seen, resolved))
    return deep_merge(base, data)


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str) -> set[str]:
    """Apply `section.key=value` strings in place (values parsed as YAML); return the dotted keys set."""
    done = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(
                f"{where}: bad --set '{item}': expected section.key=value, e.g. training.learning_rate=1e-5"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise RecipeError(f"{where}: bad --set '{item}': value is not valid YAML ({err})") from err
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"{where}: bad --set '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
        done.add(key)
    return done


# -------------------------------------------------------------------------------------------- validation


def build_recipe(
    raw: dict[str, Any], source: Path | None = None, overridden: set[str] | None = None, problems: list | None = None
) -> Recipe:
    """Validate a merged recipe mapping into a `Recipe` (types, ranges, unknown keys, required values).

    Every problem is found, not only the first: into `problems` when given, else raised together at the end."""
    where = str(source) if source else "<recipe>"
    found: list = [] if problems is None else problems
    ctx = Context(where, overridden or set(), problems=found)
    recipe = coerce(Recipe, dict(raw), "", ctx)
    recipe.rewards = [r for r in recipe.rewards if r is not None]  # an entry too broken to build is reported
    recipe.source = source
    recipe.raw = copy.deepcopy(raw)
    recipe.overridden = set(overridden or ())
    if not recipe.name:
        recipe.name = source.stem if source else recipe.trainer
    if isinstance(recipe.data.train, list):
        mixture = recipe.data.mixture
        seed = recipe.seed if mixture.seed is None else mixture.seed
        recipe.data.train = {"mix": recipe.data.train, "stopping": mixture.stopping, "seed": seed}
    if recipe.model.path is None and recipe.model.tiny is None:
        ctx.report(
            RecipeError(f"{where}: model needs 'path' (a local dir or hub id) or 'tiny' (a tiny local model spec)")
        )
    if recipe.model.path is not None and recipe.model.tiny is not None:
        ctx.report(RecipeError(f"{where}: model has both 'path' and 'tiny'; keep one"))
    if problems is None and found:
        raise problems_error(where, found)
    return recipe


class RecipeProblems(RecipeError):
    """Several problems of one recipe, reported together; `problems` holds each message (file prefix removed)."""

    def __init__(self, where: str, problems: list[str]):
        self.where, self.problems = where, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where}: {len(problems)} problems (nothing was loaded or trained):\n{lines}")


def problems_error(where: str, problems: list) -> Exception:
    """One error for a recipe's problems: the problem itself when there is one, else all of them, one a line."""
    if len(problems) == 1:
        return problems[0]  # its own type (RecipeError, DataError, ...)
    prefix = f"{where}: "
    messages = list(dict.fromkeys(str(p).removeprefix(prefix) for p in problems))
    return RecipeProblems(where, messages) if len(messages) > 1 else RecipeError(prefix + messages[0])


@dataclass
class Context:
    """Where a value came from, for errors: the recipe file and the keys set with --set. With `problems` (a list),
    `report` collects errors so that validation goes on and finds every problem of the recipe."""

    where: str
    overridden: set[str] = field(default_factory=set)
    problems: list | None = None

    def error(self, dotted: str, message: str) -> RecipeError:
        origin = (
            " (set with --set)"
            if any(dotted == o or dotted.startswith(o + ".") or o.startswith(dotted + ".") for o in self.overridden)
            else ""
        )
        return RecipeError(f"{self.where}: {message}{origin}")

    def report(self, err: Exception) -> None:
        if self.problems is None:
            raise err
        self.problems.append(err)


def bounds_problem(value: Any, bounds: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with a number against `bounds` (keys gt, ge, lt, le, finite), e.g. "must be > 0, got -1", or
    None. Non-numbers and None pass (their type is checked elsewhere)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    ops = {"gt": (">", lambda a, b: a > b), "ge": (">=", lambda a, b: a >= b),
           "lt": ("<", lambda a, b: a < b), "le": ("<=", lambda a, b: a <= b)}  # fmt: skip
    rules = [(sym, bound, ok) for key, (sym, ok) in ops.items() if (bound := bounds.get(key)) is not None]
    finite = value == value and value not in (float("inf"), float("-inf"))
    if (rules or bounds.get("finite")) and not finite:
        return f"must be a finite number, got {value!r}"
    if all(ok(value, bound) for _, bound, ok in rules):
        return None
    wanted = " and ".join(f"{sym} {bound:g}" for sym, bound, _ in rules)
    return f"must be {wanted}, got {value!r}"


def coerce(tp: Any, value: Any, dotted: str, ctx: Context, lenient: bool = False) -> Any:
    """Check/convert `value` against type annotation `tp`; `dotted` names the key for errors.

    The one value coercer: posttrain's sections, each trainer's options and the library config fields all go
    through it. `lenient` is for a library's config (TRL, transformers): a type posttrain doesn't model (an enum,
    a scheduler name) accepts the value as given and the library's own __post_init__ judges it; a `str` field
    also takes a bool (TRL maps e.g. `scale_rewards: false` to "none"), a list field a single value.
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _coerce_dataclass(tp, value, dotted, ctx, lenient)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, dotted, ctx, lenient)
            except RecipeError as err:
                errors.append(err)
        raise (
            errors[-1] if len(errors) == 1 else ctx.error(dotted, f"'{dotted}' has the wrong type: {_describe(value)}")
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ctx.error(dotted, f"'{dotted}' must be one of {options}, got {value!r}")
        return value
    if origin is list:
        if lenient and not isinstance(value, list):
            value = [value]  # libraries take one value for a list field (TRL: loss_type: sigmoid -> [sigmoid])
        if not isinstance(value, list):
            raise ctx.error(dotted, f"'{dotted}' must be a list, got {_describe(value)}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(item_tp, v, f"{dotted}[{i}]", ctx, lenient) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(dotted, f"'{dotted}' must be a mapping, got {_describe(value)}")
        return dict(value)
    if lenient and tp is str and isinstance(value, bool):
        return value
    if lenient and isinstance(tp, type) and tp not in (bool, int, float, str):
        return value
    return _scalar(tp, value, lambda msg: ctx.error(dotted, f"'{dotted}' {msg}"))


def _coerce_dataclass(tp: Any, value: Any, dotted: str, ctx: Context, lenient: bool) -> Any:
    """A section: unknown keys named with the nearest valid one, each field coerced and range-checked (bounds in
    the field's metadata). Each bad key is reported on its own; the field keeps its default so checks go on."""
    if not isinstance(value, dict):
        raise ctx.error(dotted, f"'{dotted}' must be a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(tp)
    names = [f.name for f in dataclasses.fields(tp) if f.name not in _INTERNAL]
    for key in value:
        if key not in names:
            full = f"{dotted}.{key}" if dotted else key
            ctx.report(ctx.error(full, unknown_key(key, names, f"'{dotted}'" if dotted else "at the top level")))
    kwargs = {}
    for f in dataclasses.fields(tp):
        full = f"{dotted}.{f.name}" if dotted else f.name
        if f.name in value:
            try:
                kwargs[f.name] = coerce(hints[f.name], value[f.name], full, ctx, lenient)
                wrong = bounds_problem(kwargs[f.name], f.metadata)
                if wrong:
                    raise ctx.error(full, f"'{full}' {wrong}")
            except RecipeError as err:
                kwargs.pop(f.name, None)
                ctx.report(err)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            ctx.report(ctx.error(dotted, f"missing required key '{f.name}' in '{dotted or 'recipe'}'"))
            return None  # reported; the caller drops it (e.g. a reward entry without a name)
    return tp(**kwargs)


def _scalar(tp: Any, value: Any, fail: typing.Callable[[str], Exception]) -> Any:
    """Accept `value` for a scalar type; YAML 1.1 reads `1e-5` as a string, so numeric strings become floats."""
    if tp is Any or isinstance(tp, typing.TypeVar) or isinstance(tp, str):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail(f"must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail(f"must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise fail(f"must be a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail(f"must be a string, got {_describe(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail(f"must be {tp.__name__}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


# ------------------------------------------------------------------------------------------------ output


def to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML, reproducible with `posttrain train`."""
    data = dataclasses.asdict(recipe)
    for key in _INTERNAL:
        data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)
