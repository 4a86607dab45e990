"""The package's shape, as docs/architecture.md states it: no import cycle (imports inside functions count), imports
point down the floors, reward_models imports nothing of posttrain, no module over 500 lines, no function over 60, no
class over 200, trainer options that exist once (the registry derives every allowed key from them), and facts about a
trainer kept by its owner: no other module names a trainer."""

import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("posttrain", "reward_models")

# Floors of docs/architecture.md, top to bottom: a module may import modules of its own floor or lower ones.
FLOORS = [
    (
        "posttrain.cli",
        "posttrain.quickstart",
        "posttrain.rehearse",
        "posttrain.hub",
        "posttrain.slurm",
        "posttrain.__main__",
    ),
    ("posttrain.train",),
    ("posttrain.trainers",),
    ("posttrain.registry", "posttrain.preflight", "posttrain.rehearsal_edit", "posttrain.model_card"),
    ("posttrain.evaluation",),
    ("posttrain.rollout",),
    ("posttrain.data",),
    ("posttrain.models",),
    ("posttrain.runs", "posttrain.report"),
    ("posttrain.recipe", "posttrain.recipe_yaml"),
    ("posttrain.errors", "posttrain.shipped", "posttrain"),
]
# Known, documented exceptions (docs/architecture.md): none may be added without saying why there.
UPWARD_ALLOWED: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (the longest known module each name refers to)."""

    def resolve(name: str) -> str | None:
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    edges: dict[str, set[str]] = {}
    for mod, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                dst = resolve(name)
                if dst and dst != mod and not mod.startswith(dst + "."):
                    targets.add(dst)
        edges[mod] = targets
    return edges


def _floor(mod: str) -> int:
    for rank, prefixes in enumerate(FLOORS):
        if any(mod == p or (p != "posttrain" and mod.startswith(p + ".")) for p in prefixes):
            return rank
    raise AssertionError(f"{mod} is on no floor of docs/architecture.md")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of 2+ modules (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, _imports(modules)


def test_no_import_cycles_counting_imports_inside_functions(graph):
    _, edges = graph
    assert _cycles(edges) == []


def test_reward_models_imports_nothing_from_posttrain(graph):
    _, edges = graph
    bad = sorted(
        (m, d) for m, ds in edges.items() for d in ds if m.startswith("reward_models") and d.startswith("posttrain")
    )
    assert bad == []


def test_posttrain_imports_point_down_the_floors(graph):
    _, edges = graph
    upward = sorted(
        (m, d)
        for m, ds in edges.items()
        if m.startswith("posttrain")
        for d in ds
        if d.startswith("posttrain") and _floor(d) < _floor(m) and (m, d) not in UPWARD_ALLOWED
    )
    assert upward == []


def test_no_module_over_500_lines_no_function_over_60_no_class_over_200(graph):
    modules, _ = graph
    long_modules = [(m, n) for m, p in modules.items() if (n := len(p.read_text().splitlines())) > 500]
    long_blocks = [
        (m, node.name, node.end_lineno - node.lineno + 1)
        for m, p in modules.items()
        for node in ast.walk(ast.parse(p.read_text()))
        if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60)
        or (isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200)
    ]
    assert long_modules == [] and long_blocks == []


# Trainer names that are also other things' names, checked only where they are compared with a recipe's trainer:
# "reward" is TRL's logged reward metric too (report curves, progress keys).
_NAMES_WITH_OTHER_MEANINGS = {"reward"}
# Modules that must ask a trainer's SPEC or module hooks, never its name.
_SHARED = ("posttrain.models.memory", "posttrain.preflight", "posttrain.rehearse", "posttrain.rehearsal_edit",
           "posttrain.train", "posttrain.trainers.base", "posttrain.trainers.lifecycle")  # fmt: skip


def _owner(module: str, names: set[str]) -> str | None:
    """The trainer a module under posttrain.trainers belongs to (`trainers/nft.py`, `trainers/nft_loss.py`)."""
    stem = module.removeprefix("posttrain.trainers.").split(".")[0]
    return next((n for n in names if stem == n or stem.startswith(n + "_")), None)


def _trainer_name_uses(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each trainer name written as a string constant, and of each comparison of a `.trainer`
    attribute with a string."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "trainer" for s in sides):
                consts = [
                    c for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
                found += [(node.lineno, f"trainer compared with {c.value!r}") for c in consts]
        if isinstance(node, ast.Constant) and node.value in names - _NAMES_WITH_OTHER_MEANINGS:
            found.append((node.lineno, node.value))
    return found


def test_no_module_names_a_trainer_but_its_own():
    """Shared modules ask a trainer's SPEC; a trainer's modules name no other trainer; nothing compares a recipe's
    trainer with a name (the registry's TRAINERS dict is the one list of names)."""
    from posttrain.registry import TRAINERS

    names = set(TRAINERS)
    bad = []
    for module, path in _modules().items():
        if module in ("posttrain.registry", "posttrain.cli") or not module.startswith("posttrain"):
            continue  # the registry lists the names; the CLI's help text may cite one as an example
        uses = _trainer_name_uses(path, names)
        if module.startswith("posttrain.trainers."):
            own = _owner(module, names)
            uses = [(line, n) for line, n in uses if n != own]
        elif not module.startswith(_SHARED):
            uses = [(line, n) for line, n in uses if n.startswith("trainer compared")]
        bad += [(module, line, n) for line, n in uses]
    assert bad == []


def test_the_trainer_name_check_sees_a_name_in_a_shared_module(tmp_path):
    path = tmp_path / "memory.py"
    path.write_text('def f(recipe):\n    return recipe.trainer in ("grpo", "nft") or recipe.trainer == "dpo"\n')
    found = _trainer_name_uses(path, {"grpo", "nft", "dpo", "reward"})
    assert sorted(n for _, n in found) == sorted(
        ["dpo", "grpo", "nft", "trainer compared with 'dpo'", "trainer compared with 'grpo'",
         "trainer compared with 'nft'"]
    )  # fmt: skip


def test_every_trainer_module_is_torch_free_at_import_and_declares_its_spec():
    import subprocess
    import sys

    from posttrain.registry import TRAINERS

    code = (
        "import importlib, sys\n"
        f"for name in {list(TRAINERS.values())!r}:\n"
        "    spec = importlib.import_module(name).SPEC\n"
        "heavy = [m for m in ('torch', 'trl', 'diffusers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_allowed_keys_are_derived_from_each_trainers_options_and_library_config():
    from posttrain.registry import TRAINERS, allowed_keys, get_spec, library_field_types

    for name in TRAINERS:
        spec = get_spec(name)
        assert spec.name == name
        algorithm, training = allowed_keys(spec)
        if spec.options is not None:
            fields = dataclasses.fields(spec.options)
            assert {f.name for f in fields} <= set(algorithm)
            assert all(f.metadata.get("help") for f in fields), name  # every option documents itself
        library = library_field_types(spec.library_config)
        assert spec.method_keys <= set(library), name  # method keys are real library fields
        assert set(training) <= set(library) | {"time_budget_s", "precision"}
        assert not set(training) & set(algorithm)


def test_library_kwargs_strip_posttrain_keys_for_every_trainer(tmp_path):
    from posttrain.registry import library_kwargs, load_and_validate

    path = tmp_path / "nft.yaml"
    path.write_text(
        "trainer: nft\nmodel: {tiny: {task: arithmetic}}\ndata: {train: {synthetic: arithmetic, split: train}}\n"
        "rewards: [{name: numeric_match}]\n"
        "algorithm: {weight: sqrt, loss_type: dr_grpo}\n"
        "training: {learning_rate: 1.0e-4, time_budget_s: 30, precision: fp32}\n"
    )
    kwargs = library_kwargs(load_and_validate(path))
    assert kwargs == {"learning_rate": 1e-4, "loss_type": "dr_grpo"}


def _copied_defaults(path: Path, fields: set[str]) -> list[tuple[int, str]]:
    """(line, key) of each `<recipe>.training.get("<library field>", <constant>)` (or `.algorithm`, or a name bound
    to either in the same function): a library default copied by hand."""
    found = []
    for func in ast.walk(ast.parse(path.read_text())):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        sections = {"training", "algorithm"}
        aliases = set()
        for node in ast.walk(func):
            if isinstance(node, ast.Assign):
                pairs = [(t, v) for t, v in zip(node.targets[0].elts, node.value.elts)] if isinstance(
                    node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple) else [(node.targets[0], node.value)]  # fmt: skip
                aliases |= {t.id for t, v in pairs if isinstance(t, ast.Name) and isinstance(v, ast.Attribute)
                            and v.attr in sections}  # fmt: skip
        for node in ast.walk(func):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
                continue
            owner = node.func.value
            on_section = (isinstance(owner, ast.Attribute) and owner.attr in sections) or (
                isinstance(owner, ast.Name) and owner.id in aliases
            )
            args = node.args
            if on_section and len(args) == 2 and isinstance(args[0], ast.Constant) and args[0].value in fields:
                if isinstance(args[1], ast.Constant) and args[1].value is not None:
                    found.append((node.lineno, args[0].value))
    return sorted(set(found))


def test_no_library_default_is_copied_by_hand():
    """Library defaults reach posttrain through `recipe.settings` (read from the library's dataclass): a copied
    `.get("per_device_train_batch_size", 8)` drifts when the library changes it."""
    from posttrain.registry import TRAINERS, get_spec, library_field_types

    fields = set()
    for name in TRAINERS:
        config = get_spec(name).library_config
        fields |= set(library_field_types(config)) if config else set()
    bad = [(m, *hit) for m, p in _modules().items() if m.startswith("posttrain") for hit in _copied_defaults(p, fields)]
    assert bad == []


def test_the_copied_default_check_sees_one(tmp_path):
    path = tmp_path / "plan.py"
    path.write_text(
        "def f(recipe, spec):\n"
        "    t, a = recipe.training, recipe.algorithm\n"
        '    return t.get("per_device_train_batch_size", 8) * a.get("beta", 0.1) * recipe.training.get("seed", 0)'
        ' * spec.get("seed", 0) * t.get("seed")\n'
    )
    assert _copied_defaults(path, {"per_device_train_batch_size", "seed", "beta"}) == [
        (3, "beta"), (3, "per_device_train_batch_size"), (3, "seed")]  # fmt: skip
