"""Tools and environments for multi-turn rollouts: `rollout.tools`, `rollout.environment`, `rollout.max_tool_calls`.

TRL's GRPOTrainer owns the tool loop (generate; parse the calls with the tokenizer's response template; call the
tools; append their results as `tool` turns, masked out of the loss by `tool_mask`; generate again, up to
`max_tool_calling_iterations` rounds). What posttrain adds is what TRL leaves to the user:

- user code named `package.module:attr` is imported and checked the way TRL will use it, before any model loads
  (`problems`): each tool has type hints and a docstring (TRL renders its JSON schema from them), an environment
  has `reset`, its public methods are tools too;
- each tool is wrapped (`guard`) so a tool that raises is recorded with its name and arguments (TRL hands the
  error text to the model, as its loop does, and the rollout goes on); the trainer's mixin
  (posttrain.trainers.tool_rollouts) ties each failure to its sample and reports it.

Tools ship with their tasks (`posttrain.data.tool_arithmetic:multiply`); `reward_models.code_exec:run_python` is the
sandboxed Python tool.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.errors import DataError, RecipeError

# The data column TRL routes a row to its environment by, when `rollout.environment` maps names to classes.
ENVIRONMENT_COLUMN = "environment"
# Methods of an environment that are not tools (TRL: `reset` starts an episode, `get_reward` scores it).
ENVIRONMENT_HOOKS = ("reset", "get_reward")


def uses_tools(recipe: Any) -> bool:
    """Whether the recipe asks for multi-turn rollouts (any of the three keys set)."""
    r = recipe.rollout
    return bool(r.tools) or r.environment is not None or r.max_tool_calls is not None


def import_ref(ref: Any, key: str) -> Any:
    """The object named `package.module:attr` (a dotted attr path allowed); a RecipeError naming `key` otherwise."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise RecipeError(f"{key}: expected 'package.module:name', got {ref!r}")
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure of user code is the user's to see
        raise RecipeError(f"{key}: cannot import module '{module_name}' ({type(err).__name__}: {err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{key}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def tool_problem(func: Any) -> str | None:
    """Why TRL could not offer `func` as a tool (None when it can): a callable with a type hint on every argument
    and a docstring describing them, from which transformers renders the JSON schema the model sees."""
    from transformers.utils import get_json_schema

    if not callable(func):
        return f"is not callable ({type(func).__name__})"
    try:
        get_json_schema(func)
    except Exception as err:  # noqa: BLE001 - TypeError / DocstringParsingException, worded by transformers
        return (
            f"cannot be offered as a tool: {err} (a tool needs a type hint on every argument and a docstring "
            "with an Args section: TRL renders its JSON schema from them)"
        )
    return None


def environment_tools(cls: type) -> list[str]:
    """The public methods of an environment class that TRL exposes as tools (all but reset/get_reward)."""
    return [
        name
        for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
        if not name.startswith("_") and name not in ENVIRONMENT_HOOKS
    ]


def environment_refs(recipe: Any) -> dict[str | None, str]:
    """`rollout.environment` as {name: ref}: one environment is {None: ref}; a mapping routes rows by their
    `environment` column."""
    env = recipe.rollout.environment
    if env is None:
        return {}
    return {None: env} if isinstance(env, str) else dict(env)


def offered(recipe: Any) -> list[str]:
    """What a rollout's tool loop offers, in words: each tool's name, then each environment's methods (with the rows
    a named one serves). One wording for the dry-run plan and the rehearsal."""
    names = [ref.rpartition(":")[2] for ref in recipe.rollout.tools]
    names += [f"the methods of {ref.rpartition(':')[2]}" + (f" (rows with environment={name!r})" if name else "")
              for name, ref in environment_refs(recipe).items()]  # fmt: skip
    return names


def wanted(recipe: Any) -> bool:
    """Whether training or the held-out evaluation runs a tool loop."""
    return uses_tools(recipe) or bool(recipe.eval.tools) or recipe.eval.max_tool_calls is not None


REFUSED = "does not run multi-turn rollouts"


def recipe_problems(recipe: Any, spec: Any, able: list[str]) -> list[RecipeError]:
    """The trainer takes the rollout keys (else only that, naming the key and `able`, the trainers that do), the
    code they name is well-formed (`problems`), and a round cap has something to cap."""
    r, where = recipe.rollout, recipe.where
    if uses_tools(recipe) and not spec.tools:
        key = "rollout.tools" if r.tools else "rollout.environment" if r.environment is not None else "rollout.max_tool_calls"  # fmt: skip
        return [
            RecipeError(
                f"{where}: {key}: trainer '{spec.name}' {REFUSED} (tools and environments work with: "
                f"{', '.join(able)}; eval.tools runs the held-out evaluation with tools for any trainer)"
            )
        ]
    found = problems(recipe)
    if r.max_tool_calls is not None and not r.tools and r.environment is None:
        found.append(RecipeError(f"{where}: rollout.max_tool_calls is set but no rollout.tools or rollout.environment"))
    if recipe.eval.max_tool_calls is not None and not (recipe.eval.tools or r.tools or r.environment is not None):
        found.append(RecipeError(f"{where}: eval.max_tool_calls is set but no eval.tools or rollout.tools"))
    return found


def template_problem(tokenizer: Any) -> str | None:
    """Why the tokenizer's chat template cannot drive the tool loop (None when it can): it must render a whole
    tool-calling exchange and have a response template to parse the calls with (its own, or one TRL knows)."""
    import copy

    from trl.chat_template_utils import add_response_schema, supports_tool_calling

    fix = ("set data.chat_template to one that can (a TRL bundled name such as qwen2_5 or llama3, or a .jinja "
           "file), or use a model whose template does")  # fmt: skip
    if tokenizer.chat_template is None:
        return f"the tokenizer has no chat template; {fix}"
    if not supports_tool_calling(tokenizer):
        return (f"the chat template cannot render a tool-calling conversation (user -> assistant with tool_calls -> "
                f"tool): {fix}")  # fmt: skip
    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        try:
            add_response_schema(copy.deepcopy(tokenizer))
        except ValueError:
            return (f"no response template to parse tool calls with: the tokenizer has none and TRL knows none for "
                    f"its chat template; set the tokenizer's response_template, or {fix}")  # fmt: skip
    return None


def row_problems(recipe: Any, rows: Any) -> list[DataError]:
    """Tool rollouts need conversational prompts (the template renders the tools into them); a mapping of
    environments needs each row's `environment` column to name one of them."""
    from posttrain.data.chat import is_conversation

    if not uses_tools(recipe) or not len(rows) or "prompt" not in rows.column_names:
        return []
    found = []
    if not is_conversation(rows[0]["prompt"]):
        found.append(
            DataError(
                f"{recipe.where}: data.train row 0: rollout.tools needs conversational prompts (a list of "
                f"{{role, content}} messages: the chat template renders the tools into them), got text "
                f"{str(rows[0]['prompt'])[:60]!r}"
            )
        )
    names = environment_refs(recipe)
    if names and None not in names:
        if ENVIRONMENT_COLUMN not in rows.column_names:
            return [*found, DataError(f"{recipe.where}: data.train has no '{ENVIRONMENT_COLUMN}' column to pick each "
                                      f"row's environment among rollout.environment's {', '.join(names)}")]  # fmt: skip
        for i, value in enumerate(rows[ENVIRONMENT_COLUMN]):
            if value not in names:
                found.append(DataError(f"{recipe.where}: data.train row {i}: {ENVIRONMENT_COLUMN} {value!r} is not one "
                                       f"of rollout.environment's {', '.join(names)}"))  # fmt: skip
                break
    return found


def tools_plan(recipe: Any) -> str:
    """What the tool loops offer, for plans and rehearsals: tools and environments, and the round caps."""
    r = recipe.rollout
    names = offered(recipe)
    parts = []
    if names:
        parts.append(f"rollouts offer {', '.join(names)} (max_tool_calls {r.max_tool_calls or 'unbounded'})")
    key, refs = eval_tool_refs(recipe)
    if refs or names:
        shown = [ref.rpartition(":")[2] for ref in refs] or names
        parts.append(f"the held-out evaluation offers {', '.join(shown)} ({key}; max_tool_calls "
                     f"{recipe.eval.max_tool_calls or r.max_tool_calls or 4})")  # fmt: skip
    return "; ".join(parts)


def eval_tool_refs(recipe: Any) -> tuple[str, list[str]]:
    """The tools the held-out evaluation calls and the key naming them: eval.tools, else rollout.tools."""
    if recipe.eval.tools:
        return "eval.tools", list(recipe.eval.tools)
    return "rollout.tools", list(recipe.rollout.tools)


def eval_tools(recipe: Any) -> tuple[list[Callable], int | None, dict[str | None, type]]:
    """The held-out evaluation's tool loop: its tools, its round cap and its environment classes. eval.tools replaces
    the rollout's tools and environments; else rollout.tools and rollout.environment, of which the loop makes one
    instance per sample (posttrain.rollout.tool_loop). ([], None, {}) for a one-turn evaluation."""
    key, refs = eval_tool_refs(recipe)
    funcs = [import_ref(ref, f"{key}[{i}]") for i, ref in enumerate(refs)]
    envs = {} if recipe.eval.tools else environment_refs(recipe)
    classes = {
        name: import_ref(ref, "rollout.environment" + (f".{name}" if name else "")) for name, ref in envs.items()
    }
    rounds = recipe.eval.max_tool_calls or recipe.rollout.max_tool_calls
    return funcs, rounds, classes


def problems(recipe: Any) -> list[RecipeError]:
    """Everything wrong with the recipe's tools and environments, each naming its key (nothing is instantiated)."""
    found: list[RecipeError] = []
    where = recipe.where
    listed = [(f"rollout.tools[{i}]", ref) for i, ref in enumerate(recipe.rollout.tools)]
    listed += [(f"eval.tools[{i}]", ref) for i, ref in enumerate(recipe.eval.tools)]
    for key, ref in listed:
        try:
            func = import_ref(ref, key)
        except RecipeError as err:
            found.append(RecipeError(f"{where}: {err}"))
            continue
        wrong = tool_problem(func)
        if wrong:
            found.append(RecipeError(f"{where}: {key} '{ref}' {wrong}"))
    for name, ref in environment_refs(recipe).items():
        key = "rollout.environment" if name is None else f"rollout.environment.{name}"
        try:
            cls = import_ref(ref, key)
        except RecipeError as err:
            found.append(RecipeError(f"{where}: {err}"))
            continue
        if not inspect.isclass(cls):
            found.append(RecipeError(f"{where}: {key} '{ref}' must be a class (TRL makes one instance per rollout)"))
            continue
        if not callable(getattr(cls, "reset", None)):
            found.append(
                RecipeError(
                    f"{where}: {key} '{ref}' has no reset() method (TRL calls reset(**row) to start each episode)"
                )
            )
        methods = environment_tools(cls)
        if not methods and not recipe.rollout.tools:
            found.append(RecipeError(f"{where}: {key} '{ref}' has no public methods to offer as tools"))
        for method in methods:
            wrong = tool_problem(getattr(cls, method))
            if wrong:
                found.append(RecipeError(f"{where}: {key} '{ref}': method {method}() {wrong}"))
    return found


class ToolLog:
    """Tool failures since the trainer last collected them (thread-safe: TRL may call tools from threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._failures: list[dict[str, Any]] = []

    def record(self, tool: str, arguments: Mapping[str, Any], error: BaseException) -> None:
        with self._lock:
            self._failures.append(
                {"tool": tool, "arguments": dict(arguments), "error": f"{type(error).__name__}: {error}",
                 "message": str(error)}
            )  # fmt: skip

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            out, self._failures = self._failures, []
        return out


def guard(func: Callable, log: ToolLog, name: str | None = None) -> Callable:
    """`func` recording its failures in `log` and re-raising them (TRL turns the error into the tool's result).
    The wrapper keeps the name, signature, hints and docstring TRL builds the tool's schema from."""
    tool = name or func.__name__
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def guarded_async(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except Exception as err:
                log.record(tool, kwargs, err)
                raise

        return guarded_async

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as err:
            log.record(tool, kwargs, err)
            raise

    return guarded


def guarded_environment(cls: type, log: ToolLog) -> type:
    """A subclass of `cls` whose tool methods record their failures (TRL lists tools on the class)."""
    methods = {name: guard(getattr(cls, name), log, name) for name in environment_tools(cls)}
    return type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "__doc__": cls.__doc__})


def trainer_kwargs(recipe: Any, log: ToolLog) -> dict[str, Any]:
    """GRPOTrainer's `tools=` and `environment_factory=` from the recipe, each tool guarded; {} without tools."""
    out: dict[str, Any] = {}
    if recipe.rollout.tools:
        out["tools"] = [
            guard(import_ref(ref, f"rollout.tools[{i}]"), log) for i, ref in enumerate(recipe.rollout.tools)
        ]
    refs = environment_refs(recipe)
    if refs:
        factories = {
            name: guarded_environment(import_ref(ref, f"rollout.environment{'' if name is None else '.' + name}"), log)
            for name, ref in refs.items()
        }
        out["environment_factory"] = factories[None] if None in factories else factories
    return out
