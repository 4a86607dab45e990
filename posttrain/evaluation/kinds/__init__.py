"""Benchmark kinds by name: what a suite's `kind:` may say, and what each kind does.

A kind is one module that builds a `BenchmarkKind` and registers it (`register_kind`), as rewards register
themselves. Suite loading reads what the kind allows (its generation keys, whether `scorer`/`baseline` apply,
whether `grader` must name a grader) and which settings enter its stored hash; `build_benchmark` builds its rows
with `kind.build`; the suite runner runs and scores it with `kind.run`; a rehearsal (`train --rehearse`) asks it
for stand-in data (`stand_in_data`) and a cut-down suite entry (`shrink_for_rehearsal`). Nothing else branches on
a kind's name, so a new kind is one module plus its registration:

```python
# posttrain/evaluation/kinds/mine.py (then a line in BUILTIN_KINDS), or your own module, imported before the suite
# loads
from posttrain.evaluation.kinds import BenchmarkKind, register_kind

def build(spec, limit):            # -> whatever `run` takes; load data here, so errors come before any model
    ...
def run(bench, ctx):               # ctx: RunContext (model, ctx.shared_generator(), tokenizer) -> EvalResult
    ...
KIND = register_kind(BenchmarkKind(name="mine", build=build, run=run, generation_keys=("max_new_tokens",),
                                   stand_in_fields=("prompt", "answer")))
```

The built-in kinds' modules are named in `BUILTIN_KINDS` (each defines `KIND`, registered) and imported (by
importlib, like the trainer registry's modules) the first time their name is looked up; this module imports none
of them, so the suite module (which imports this one) and the kind modules (which import the suite's
`BenchmarkSpec`) form no import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import RecipeError, unknown_key

# name -> the module that registers it (imported on first use).
BUILTIN_KINDS: dict[str, str] = {
    "generate": "posttrain.evaluation.kinds.generate",
    "preference": "posttrain.evaluation.kinds.preference",
    "polar": "posttrain.evaluation.kinds.polar",
    "diffusion": "posttrain.evaluation.kinds.diffusion",
}
# The sampling keys of text generation (`generation:` of kinds that generate or cap text).
TEXT_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed")
# The settings that enter a text benchmark's stored hash (posttrain.evaluation.store.settings_hash): every stored
# text result was hashed with these keys; changing them orphans stored results (tests/test_benchmark_kinds.py).
TEXT_HASH_KEYS = ("kind", "data", "prompt", "generation", "grader", "limit")
# Columns of the stand-in rows for few-shot examples (a `prompt.few_shot_data` source).
FEW_SHOT_FIELDS = ("prompt", "answer", "solution")

_REGISTERED: dict[str, BenchmarkKind] = {}


@dataclass
class RunContext:
    """What the suite runner hands a kind's `run`: the model under evaluation and one generator shared by every
    benchmark of the suite (made the first time a kind asks for it)."""

    model: str
    backend: str = "hf"
    batch_size: int = 64
    generator: Any = None  # a posttrain.rollout Generator, given or made by `shared_generator`
    tokenizer: Any = None

    def shared_generator(self) -> Any:
        """The generator for `model` (made with posttrain.rollout.factory on first use; its tokenizer kept)."""
        if self.generator is None:
            from posttrain.rollout.factory import make_generator

            self.generator = make_generator(self.backend, model_path=self.model, batch_size=self.batch_size)
            self.tokenizer = getattr(self.generator, "tokenizer", self.tokenizer)
        return self.generator


@dataclass
class RehearsalCuts:
    """What a rehearsal hands the kinds' rehearsal hooks, and what the hooks report back.

    `stand_in_source(name, source, fields)` returns a local data source with `fields` columns standing in for
    `source` (`source` itself, the same object, when it is already local); `scorers_with_weights` are image scorers
    the rehearsal replaces by the analytic `saturation` scorer. The hooks append to `synthesised` (what a note
    should name: a benchmark whose data, or "<name> (few-shot examples)" whose examples, were stood in) and to
    `replaced_scorers` (the scorer names replaced)."""

    max_new_tokens: int
    stand_in_source: Callable[[str, dict[str, Any], tuple[str, ...]], dict[str, Any]]
    scorers_with_weights: tuple[str, ...] = ()
    synthesised: list[str] = field(default_factory=list)
    replaced_scorers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BenchmarkKind:
    """One benchmark kind: what a suite entry of it may set, how it is built and run, and how it is rehearsed.

    `build(spec, limit)` loads a BenchmarkSpec's data (errors name the benchmark) into what `run(bench, ctx)`
    evaluates, returning an EvalResult (posttrain.evaluation.runner). The rehearsal hooks default to the text
    kinds' behaviour (`stand_in_fields` rows, max_new_tokens capped); a kind of other data gives its own
    `rehearse_data(bench, cuts)` / `rehearse_entry(entry, bench, cuts)`."""

    name: str
    build: Callable[[Any, int | None], Any]
    run: Callable[[Any, RunContext], Any]
    generation_keys: tuple[str, ...] = TEXT_GENERATION_KEYS
    takes_scorer: bool = False  # `scorer` and `baseline` apply (image scorers, a baseline model)
    needs_grader: bool = False  # `grader` must name one of the graders (suite.GRADER_NAMES)
    runs_in_training: bool = False  # a text training run evaluates it on its policy (benchmarks.recipe_benchmarks)
    hash_keys: tuple[str, ...] = TEXT_HASH_KEYS  # BenchmarkSpec fields in its stored settings hash
    stand_in_fields: tuple[str, ...] | None = ("prompt",)  # synthetic rows' columns; None: not text rows
    rehearse_data: Callable[[Any, RehearsalCuts], dict[str, Any]] | None = None
    rehearse_entry: Callable[[dict[str, Any], Any, RehearsalCuts], dict[str, Any]] | None = None
    description: str = ""

    def settings(self, spec: Any) -> dict[str, Any]:
        """Everything that determines a benchmark's numbers, for the results store's settings hash."""
        return {key: getattr(spec, key) for key in self.hash_keys}

    def stand_in_data(self, bench: Any, cuts: RehearsalCuts) -> dict[str, Any]:
        """The data source a rehearsal evaluates `bench` (a BenchmarkSpec) on: `bench.data` itself when it is
        local, else synthetic rows of `stand_in_fields` (plus the slice column), named in `cuts.synthesised`."""
        if self.rehearse_data is not None:
            return self.rehearse_data(bench, cuts)
        if self.stand_in_fields is None:
            return bench.data
        fields = (*self.stand_in_fields, bench.slice_column) if bench.slice_column else self.stand_in_fields
        data = cuts.stand_in_source(bench.name, bench.data, fields)
        if data is not bench.data:
            cuts.synthesised.append(bench.name)
        return data

    def shrink_for_rehearsal(self, entry: dict[str, Any], bench: Any, cuts: RehearsalCuts) -> dict[str, Any]:
        """The rehearsal's suite entry for `bench`: `entry` (name, kind, data, limit) completed with the kind's
        settings, cut down to run in seconds."""
        if self.rehearse_entry is not None:
            return self.rehearse_entry(entry, bench, cuts)
        return shrink_text_entry(entry, bench, cuts, cap_tokens="max_new_tokens" in self.generation_keys)


def shrink_text_entry(entry: dict[str, Any], bench: Any, cuts: RehearsalCuts, cap_tokens: bool = True) -> dict:
    """A text benchmark rehearsed: max_new_tokens capped at `cuts.max_new_tokens`, few-shot examples that are not
    local stood in, the prompt, grader, metrics and slice column kept."""
    gen = dict(bench.generation)
    if cap_tokens:
        gen["max_new_tokens"] = min(int(gen.get("max_new_tokens", cuts.max_new_tokens)), cuts.max_new_tokens)
    prompt = dict(bench.prompt)
    if isinstance(prompt.get("few_shot_data"), dict):
        shots = cuts.stand_in_source(f"{bench.name}_shots", prompt["few_shot_data"], FEW_SHOT_FIELDS)
        if shots is not prompt["few_shot_data"]:
            cuts.synthesised.append(f"{bench.name} (few-shot examples)")
        prompt["few_shot_data"] = shots
    entry.update(prompt=prompt, generation=gen, grader=bench.grader, metrics=bench.metrics,
                 slice_column=bench.slice_column)  # fmt: skip
    return entry


def _identity(kind: BenchmarkKind) -> tuple[str, str, str]:
    return kind.name, getattr(kind.build, "__module__", ""), getattr(kind.build, "__qualname__", "")


def register_kind(kind: BenchmarkKind) -> BenchmarkKind:
    """Make `kind` available to suites as `kind: <kind.name>`; returns it. A name is registered once (registering
    the same kind again, as a module reload does, is allowed; a built-in name is the built-in's)."""
    if not isinstance(kind, BenchmarkKind):
        raise TypeError(f"register_kind takes a BenchmarkKind, got {type(kind).__name__}")
    if kind.name in BUILTIN_KINDS and kind.name not in _REGISTERED:
        _load_builtin(kind.name)  # the built-in first (None while its own module registers it)
    old = _REGISTERED.get(kind.name)
    if old is not None and _identity(old) != _identity(kind):
        raise RecipeError(f"benchmark kind '{kind.name}' is already registered (by {_identity(old)[1]})")
    _REGISTERED[kind.name] = kind
    return kind


def kind_names() -> list[str]:
    """The kinds a suite may name: the built-ins, then those registered by other modules."""
    return list(dict.fromkeys([*BUILTIN_KINDS, *_REGISTERED]))


def _load_builtin(name: str) -> BenchmarkKind | None:
    """Import a built-in kind's module and register its `KIND` (also when the module was imported before and its
    registration since dropped); None while the module is still importing."""
    kind = getattr(importlib.import_module(BUILTIN_KINDS[name]), "KIND", None)
    if kind is not None:
        _REGISTERED.setdefault(name, kind)
    return kind


def benchmark_kind(name: Any, where: str = "") -> BenchmarkKind:
    """The kind registered as `name` (a built-in's module is imported on first use); an unknown name is a
    RecipeError naming the nearest kind and listing them all."""
    if isinstance(name, str) and name not in _REGISTERED and name in BUILTIN_KINDS:
        _load_builtin(name)
    if isinstance(name, str) and name in _REGISTERED:
        return _REGISTERED[name]
    names = kind_names()
    prefix = f"{where}: " if where else ""
    if isinstance(name, str) and name in BUILTIN_KINDS:
        raise RecipeError(f"{prefix}benchmark kind '{name}': module {BUILTIN_KINDS[name]} defines no KIND")
    raise RecipeError(f"{prefix}{unknown_key(name, names, noun='benchmark kind')}")
