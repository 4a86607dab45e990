"""The package's shape, as docs/architecture.md states it: no import cycle (imports inside functions count), imports
point down the floors, reward_models imports nothing of posttrain, no module over 600 lines, no function over 80,
and trainer options that exist once (the registry derives every allowed key from them)."""

import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("posttrain", "reward_models")

# Floors of docs/architecture.md, top to bottom: a module may import modules of its own floor or lower ones.
FLOORS = [
    ("posttrain.cli", "posttrain.quickstart", "posttrain.rehearse", "posttrain.__main__"),
    ("posttrain.train",),
    ("posttrain.trainers",),
    ("posttrain.registry", "posttrain.preflight"),
    ("posttrain.evaluation",),
    ("posttrain.rollout",),
    ("posttrain.data",),
    ("posttrain.models",),
    ("posttrain.runs", "posttrain.report"),
    ("posttrain.recipe",),
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


def test_no_module_over_600_lines_and_no_function_over_80(graph):
    modules, _ = graph
    long_modules = [(m, n) for m, p in modules.items() if (n := len(p.read_text().splitlines())) > 600]
    long_functions = [
        (m, node.name, node.end_lineno - node.lineno + 1)
        for m, p in modules.items()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long_modules == [] and long_functions == []


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
