"""The suite-wide guard (tests/conftest.py): a DeprecationWarning/FutureWarning caused by posttrain's own call into a
library fails the test; the same warning from a test's own call, or from a library's internal call, does not."""

import dataclasses
import warnings

import pytest
from transformers import TrainingArguments

from tests.conftest import REPO, _own_caller

# The probes use what transformers 5.24 deprecated (`gradient_checkpointing` -> `activation_checkpointing`); older
# versions in posttrain's window (from 5.17) do not warn about them.
pytestmark = pytest.mark.skipif(
    "activation_checkpointing" not in {f.name for f in dataclasses.fields(TrainingArguments)},
    reason="this transformers has no deprecated gradient_checkpointing alias to probe with",
)


def _callers(code: str, filename: str, namespace: dict) -> list:
    seen = []

    def show(message, category, filename_, lineno, file=None, line=None):
        if "gradient_checkpointing" in str(message):
            seen.append(_own_caller())

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        exec(compile(code, filename, "exec"), namespace)
    return seen


def test_a_deprecated_argument_passed_by_posttrain_code_is_attributed_to_it(tmp_path):
    code = "import transformers\ntransformers.TrainingArguments(output_dir=OUT, gradient_checkpointing=True, use_cpu=True)\n"
    own = _callers(code, str(REPO / "posttrain" / "_probe.py"), {"OUT": str(tmp_path)})
    assert own == ["posttrain/_probe.py:2"]  # through the dataclass __init__ and __post_init__ of the library
    from_test = _callers(code, str(REPO / "tests" / "_probe.py"), {"OUT": str(tmp_path)})
    assert from_test == [None]


def test_a_library_internal_deprecated_call_is_not_posttrains(tmp_path):
    # posttrain code -> a TRL-like library function -> transformers' deprecated property: the library's call.
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))  # fmt: skip
    from trl.models import utils as trl_utils  # a module of another installed library

    lib = {"__name__": "probe"}
    exec(compile("def read(m):\n    return m.is_gradient_checkpointing\n", trl_utils.__file__, "exec"), lib)
    code = "READ(MODEL)\n"
    seen = _callers(code, str(REPO / "posttrain" / "_probe.py"),
                    {"READ": lib["read"], "MODEL": model})  # fmt: skip
    assert seen == [None]
    direct = _callers("MODEL.is_gradient_checkpointing\n", str(REPO / "posttrain" / "_probe.py"), {"MODEL": model})
    assert direct == ["posttrain/_probe.py:1"]
