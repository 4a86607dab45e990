"""A wheel carries the shipped recipes and eval suites; shipped names resolve from any directory; tiny base models
are written once, atomically. (.ci/wheel_check.sh installs the wheel into a fresh venv and runs the commands.)"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.shipped import find_shipped, recipes_dir, suites_dir

REPO = Path(__file__).resolve().parent.parent


def test_shipped_names_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = recipes_dir() / "sft" / "arithmetic.yaml"
    for arg in ("recipes/sft/arithmetic.yaml", "sft/arithmetic.yaml", "sft/arithmetic"):
        assert find_shipped(arg) == expected
    assert find_shipped("eval/suites/arithmetic.yaml", "suites") == suites_dir() / "arithmetic.yaml"
    assert find_shipped("recipes/sft/nope.yaml") == Path("recipes/sft/nope.yaml")  # reported as typed
    (tmp_path / "recipes" / "sft").mkdir(parents=True)
    own = tmp_path / "recipes" / "sft" / "arithmetic.yaml"
    own.write_text("trainer: sft\n")
    assert find_shipped("recipes/sft/arithmetic.yaml") == Path("recipes/sft/arithmetic.yaml")  # the user's file wins


def test_dry_run_of_a_shipped_recipe_from_elsewhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipes/sft/arithmetic.yaml", "--dry-run"]) == 0
    assert "trainer: sft" in capsys.readouterr().out


def test_wheel_carries_every_shipped_recipe_and_suite(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("posttrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, inside in ((REPO / "recipes", "posttrain/_shipped/recipes"),
                           (REPO / "eval" / "suites", "posttrain/_shipped/eval/suites")):  # fmt: skip
        for path in folder.rglob("*.yaml"):
            assert f"{inside}/{path.relative_to(folder).as_posix()}" in names
    assert "posttrain/cli.py" in names and "reward_models/server.py" in names


def test_tiny_base_model_is_built_once_and_atomically(tmp_path):
    from posttrain.models.loading import build_once

    calls = []

    def build(into: Path) -> None:
        calls.append(into)
        into.mkdir(parents=True)
        (into / "config.json").write_text("{}")

    target = tmp_path / "base_model"
    (tmp_path / "base_model.tmp").mkdir()  # left by a process killed mid-write
    (tmp_path / "base_model.tmp" / "junk").write_text("x")
    build_once(target, build)
    build_once(target, build)
    assert calls == [tmp_path / "base_model.tmp"]  # built into the side dir, once
    assert (target / "config.json").exists() and not (target / "junk").exists()
    assert not (tmp_path / "base_model.tmp").exists()


def _requirements() -> dict:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["vllm"]]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_the_oldest_tested_set_lies_inside_the_dependency_window():
    """.ci/oldest.txt (CI's second job) pins the floor of each windowed package: every pin must satisfy pyproject's
    specifier, and transformers' must admit vLLM 0.31 (which needs transformers < 5.18)."""
    from packaging.version import Version

    reqs = _requirements()
    pins = {}
    for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version.strip())
    assert {"transformers", "datasets", "accelerate", "peft", "huggingface-hub", "trl"} <= set(pins)
    for name, version in pins.items():
        assert reqs[name].specifier.contains(version), (name, version, str(reqs[name].specifier))
    assert pins["transformers"] < Version("5.18")
    assert reqs["vllm"].specifier.contains(Version("0.31.0")) and not reqs["vllm"].specifier.contains(Version("0.32"))


@pytest.mark.slow
def test_the_vllm_extra_resolves_to_vllm_0_31_without_installing(tmp_path):
    """pip's resolver in dry-run mode (metadata only, no CUDA wheels): `.[vllm]` gives vLLM 0.31 with the window."""
    import json
    import subprocess
    import sys

    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report",
                           str(report), f"{REPO}[vllm]"], capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0 and any(w in proc.stderr for w in ("NewConnectionError", "No matching distribution",
                                                                "Could not find a version")):  # fmt: skip
        pytest.skip(f"the package index is not reachable here: {proc.stderr.strip().splitlines()[-1][:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert found["vllm"].startswith("0.31.") and found["transformers"].startswith("5.17."), found
    assert found["trl"].startswith("1.16.")
