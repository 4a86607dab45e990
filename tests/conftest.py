"""Test setup: offline, no telemetry, no OpenMP spin-waiting; shared tiny-model fixtures."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny arithmetic model dir saved once per test session (from_pretrained-loadable)."""
    from posttrain.models.tiny import TinySpec, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinySpec(hidden_size=64, intermediate_size=128))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# A reward a random tiny model earns ~1 time in 19 by chance: GRPO must make it frequent within a few steps.
USER_REWARDS = '''
def starts_with_seven(prompts, completions, **kwargs):
    """1.0 when the completion starts with the digit 7."""
    return [1.0 if c.startswith("7") else 0.0 for c in completions]

def explodes(prompts, completions, **kwargs):
    if any("9" in p for p in prompts):
        raise ValueError("cannot score this")
    return [0.0 for _ in completions]
'''


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return tmp_path
