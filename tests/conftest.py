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


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The quickstart on seed 0 (SFT, SFT -> GRPO, SFT -> more SFT), run once per session: (its dir, its summary).
    The quickstart test reads its claims; the slow tests that start a method from the SFT model share its SFT stage."""
    from posttrain.quickstart import run_quickstart

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    return out, run_quickstart(out, seed=0)


@pytest.fixture(scope="session")
def quickstart_sft_model(quickstart_run) -> Path:
    """The quickstart's SFT stage (recipes/sft/arithmetic.yaml, seed 0: ~70% held-out, carry ~32%), for the slow tests
    that start a method from it (DPO, RLOO); its final/ dir, taken from the session's quickstart run, not retrained."""
    return quickstart_run[0] / "sft" / "final"


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


# ------------------------------------------------------------------ no deprecated calls from posttrain's own code

_OWN = (str(REPO / "posttrain") + os.sep, str(REPO / "reward_models") + os.sep)


def _own_caller() -> str | None:
    """The posttrain/reward_models frame whose call into a library issued the warning, or None.

    Walking out from the warning: frames of the warning's own package, the standard library, generated code and
    constructors (`__init__`/`__post_init__`: a config's init chain passes its caller's arguments on, e.g. TRL's
    GRPOConfig to transformers' TrainingArguments) are passed through. The first other frame decides: posttrain's
    own code (its call used the deprecated API), or a test's or another library's (e.g. TRL's GRPOTrainer reading
    `is_gradient_checkpointing` inside a generation posttrain asked for: TRL's call, not posttrain's)."""
    import sys
    import sysconfig

    stdlib = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}

    def package(name: str) -> str | None:
        for root in site:
            if name.startswith(root):
                return Path(name[len(root) :].lstrip(os.sep)).parts[0]
        return None

    frame = sys._getframe(3)  # _own_caller <- show <- warnings._showwarnmsg <- the frame that called warnings.warn
    warned_by = package(frame.f_code.co_filename)
    while frame is not None:
        name, func = frame.f_code.co_filename, frame.f_code.co_name
        owner = package(name)
        in_stdlib = owner is None and any(name.startswith(root) for root in stdlib)  # a venv's platstdlib holds site
        if (name.startswith("<") or in_stdlib or (owner is not None and owner == warned_by)
                or (owner is not None and func in ("__init__", "__post_init__"))):  # fmt: skip
            frame = frame.f_back
            continue
        if owner is None and name.startswith(_OWN):
            return f"{Path(name).relative_to(REPO)}:{frame.f_lineno}"
        return None
    return None


@pytest.fixture(autouse=True)
def _no_deprecated_calls_from_posttrain():
    """A DeprecationWarning or FutureWarning that posttrain's own call into transformers/TRL/accelerate/... causes
    fails the test (e.g. passing `gradient_checkpointing` where transformers 5.24 wants `activation_checkpointing`);
    the same warning from a test's own call into a library does not."""
    import warnings

    found: list[str] = []
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.simplefilter("always", category)
        passed_on = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (DeprecationWarning, FutureWarning)):
                caller = _own_caller()
                if caller is not None:
                    found.append(f"{category.__name__}: {message} ({filename}:{lineno}), from {caller}")
                return
            passed_on(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
    if found:
        pytest.fail("deprecated calls from posttrain's own code:\n" + "\n".join(dict.fromkeys(found)))


class ModelBuilt(AssertionError):
    pass


@pytest.fixture
def no_models(monkeypatch):
    """Any model, or tokenizer read from files, fails the test: validation must stop a bad recipe before that (a tiny
    in-memory tokenizer, which validation builds to check chat templates, is allowed)."""
    import transformers

    def refuse(*args, **kwargs):
        raise ModelBuilt("a model or tokenizer was built before the problem was reported")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "from_pretrained", refuse)
