"""Multi-turn tool rollouts (rollout.tools / rollout.environment / rollout.max_tool_calls; issue #26 item 1-2):
validation before any model loads, the tiny tool template, tool-result tokens out of the loss for GRPO and NFT, and
(slow) grpo / nft / rft training with a tool and with an environment from a tiny model SFT'd on tool demonstrations.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from posttrain.errors import PosttrainError

TOOL_MODULE = textwrap.dedent(
    '''
    def multiply(a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        return a * b


    def flaky_multiply(a: int, b: int) -> int:
        """Multiply two integers, failing when a is odd.

        Args:
            a: The first factor.
            b: The second factor.
        """
        if a % 2:
            raise RuntimeError(f"odd factor {a}")
        return a * b


    def no_hints(a, b):
        """Multiply.

        Args:
            a: The first factor.
            b: The second factor.
        """
        return a * b


    def no_doc(a: int, b: int) -> int:
        return a * b


    def five_digits(completions, **kwargs):
        """Reward 1 for a final answer of 5 or more characters: a signal that varies within groups, so the mechanics
        tests take non-zero steps (rewards see the last assistant turn's text)."""
        return [float(len(c.strip()) >= 5) for c in completions]


    class Calculator:
        """An environment: its public methods are the tools, reset starts an episode."""

        def reset(self, **kwargs):
            self.calls = 0

        def multiply(self, a: int, b: int) -> int:
            """Multiply two integers.

            Args:
                a: The first factor.
                b: The second factor.
            """
            self.calls += 1
            return a * b


    class NoReset:
        def multiply(self, a: int, b: int) -> int:
            """Multiply.

            Args:
                a: The first factor.
                b: The second factor.
            """
            return a * b
    '''
)


@pytest.fixture
def toolmod(tmp_path, monkeypatch):
    """A user module `pt_toolmod` with tools, rewards and environments, importable as `pt_toolmod:<name>`."""
    (tmp_path / "pt_toolmod.py").write_text(TOOL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pt_toolmod"


def chat_rows(path, n=8):
    rows = [{"prompt": [{"role": "user", "content": f"{100 + i}*{10 + i}="}], "answer": str((100 + i) * (10 + i)),
             "environment": "calc"} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_text(tmp_path, *, trainer="grpo", rollout="tools: [pt_toolmod:multiply]", tiny="{task: text, tools: true}",
                data=None) -> str:  # fmt: skip
    """A small recipe; `rollout` holds rollout keys, one per line at the section's indentation ("\n  " between)."""
    data = data or str(chat_rows(tmp_path / "train.jsonl"))
    return (
        f"name: tools\ntrainer: {trainer}\nmodel:\n  tiny: {tiny}\ndata:\n  train: {{path: {data}}}\n"
        "rewards:\n  - name: numeric_match\n"
        f"rollout:\n  num_generations: 4\n  max_new_tokens: 64\n  {rollout}\n"
        "training:\n  max_steps: 1\n  per_device_train_batch_size: 8\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )


def validate(tmp_path, **kw):
    from posttrain.registry import load_and_validate

    if kw.get("data") == "SFT":  # tool demonstrations as conversations
        from posttrain.data.tool_arithmetic import demonstration

        rows = [{"messages": demonstration(100 + i, 12, tool=bool(i % 2), answer=0), "answer": "0"} for i in range(4)]
        (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        kw = {**kw, "data": str(tmp_path / "sft.jsonl")}
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(tmp_path, **kw))
    return load_and_validate(path)


def test_a_tool_recipe_validates_and_plans_its_tool_loop(tmp_path, toolmod):
    from posttrain.registry import trainer_module
    from posttrain.rollout.tools import eval_tools

    recipe = validate(tmp_path, rollout="tools: [pt_toolmod:multiply]\n  max_tool_calls: 2")
    lines = "\n".join(trainer_module("grpo").plan(recipe))
    assert "tool loop: multiply; at most 2 tool-calling round(s) per rollout, so at most 3 assistant turns" in lines
    assert [f.__name__ for f in eval_tools(recipe)[0]] == ["multiply"] and eval_tools(recipe)[1] == 2
    recipe = validate(tmp_path, rollout="environment: pt_toolmod:Calculator")
    assert "the methods of Calculator" in "\n".join(trainer_module("grpo").plan(recipe))
    tools, _, environments = eval_tools(recipe)  # the class: the loop makes one instance per sample
    assert tools == [] and [c.__name__ for c in environments.values()] == ["Calculator"] and None in environments
    # An SFT stage on tool demonstrations is evaluated with the tool loop (eval.tools), though it trains one-turn.
    recipe = validate(tmp_path, trainer="sft", data="SFT", rollout="temperature: 1.0\neval:\n  tools: [pt_toolmod:multiply]\n  max_tool_calls: 1")  # fmt: skip
    assert [f.__name__ for f in eval_tools(recipe)[0]] == ["multiply"] and eval_tools(recipe)[1] == 1


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"rollout": "tools: [pt_nosuchmodule:multiply]"}, "rollout.tools[0]: cannot import module 'pt_nosuchmodule'"),
        ({"rollout": "tools: [pt_toolmod:nothere]"}, "rollout.tools[0]: module 'pt_toolmod' has no attribute 'nothere'"),
        ({"rollout": "tools: [pt_toolmod.multiply]"}, "rollout.tools[0]: expected 'package.module:name'"),
        ({"rollout": "tools: [pt_toolmod:no_hints]"}, "rollout.tools[0] 'pt_toolmod:no_hints' cannot be offered as a tool"),
        ({"rollout": "tools: [pt_toolmod:no_doc]"}, "rollout.tools[0] 'pt_toolmod:no_doc' cannot be offered as a tool"),
        ({"rollout": "environment: pt_toolmod:NoReset"}, "rollout.environment 'pt_toolmod:NoReset' has no reset()"),
        ({"rollout": "environment: pt_toolmod:multiply"}, "rollout.environment 'pt_toolmod:multiply' must be a class"),
        ({"rollout": "environment: {calc: pt_toolmod:Calculator, other: pt_toolmod:Calculator}", "data": "NOENV"},
         "data.train has no 'environment' column"),
        ({"rollout": "max_tool_calls: 2"}, "rollout.max_tool_calls is set but no rollout.tools"),
        ({"tiny": "{task: text, chat: true}"}, "rollout.tools: the chat template cannot render a tool-calling"),
        ({"tiny": "{task: text}"}, "rollout.tools: the tokenizer has no chat template"),
        ({"trainer": "sft"}, "rollout.tools: trainer 'sft' does not run multi-turn rollouts (tools and environments "
                             "work with: grpo, nft, rft;"),
        ({"trainer": "rloo"}, "rollout.tools: trainer 'rloo' does not run multi-turn rollouts"),
        ({"data": "TEXT"}, "rollout.tools needs conversational prompts"),
        ({"trainer": "sft", "data": "SFT", "rollout": "temperature: 1.0\neval:\n  tools: [pt_toolmod:no_doc]"},
         "eval.tools[0] 'pt_toolmod:no_doc' cannot be offered as a tool"),
        ({"trainer": "sft", "data": "SFT", "rollout": "temperature: 1.0\neval:\n  max_tool_calls: 1"},
         "eval.max_tool_calls is set but no eval.tools or rollout.tools"),
        ({"trainer": "sft", "tiny": "{task: text, chat: true}", "data": "SFT", "rollout": "temperature: 1.0\neval:\n  tools: [pt_toolmod:multiply]"},
         "eval.tools: the chat template cannot render a tool-calling"),
    ],
)  # fmt: skip
def test_bad_tool_recipes_fail_before_any_model_loads(tmp_path, toolmod, kw, expected):
    if kw.get("data") == "TEXT":
        (tmp_path / "text.jsonl").write_text(json.dumps({"prompt": "1*2=", "answer": "2", "completion": "2"}) + "\n")
        kw = {**kw, "data": str(tmp_path / "text.jsonl")}
    if kw.get("data") == "NOENV":
        (tmp_path / "noenv.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "1*2="}], "answer": "2"}) + "\n")  # fmt: skip
        kw = {**kw, "data": str(tmp_path / "noenv.jsonl")}
    with pytest.raises(PosttrainError) as err:
        validate(tmp_path, **kw)
    assert expected in str(err.value)
    assert "recipe.yaml" in str(err.value)


def test_tiny_tool_template_renders_parses_and_preserves_prefixes():
    from trl.chat_template_utils import is_chat_template_prefix_preserving, parse_response, supports_tool_calling

    from posttrain.data.tool_arithmetic import demonstration, multiply
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer("text", tools=True)
    assert supports_tool_calling(tok) and is_chat_template_prefix_preserving(tok)
    text = tok.apply_chat_template(demonstration(123, 45, tool=True, answer=0), tools=[multiply], tokenize=False)
    assert text.startswith("<|im_start|>system\ntools: multiply<|im_end|>\n")
    assert '<tool_call>{"name":"multiply","arguments":{"a":123,"b":45}}</tool_call>' in text
    assert "<|im_start|>tool\n5535<|im_end|>" in text
    prefix = tok.apply_chat_template([{"role": "user", "content": "1*2="}], add_generation_prompt=True)
    call = tok('<tool_call>{"name":"multiply","arguments":{"a":7,"b":6}}</tool_call><|im_end|>', add_special_tokens=False)  # fmt: skip
    parsed = parse_response(tok, call["input_ids"], prefix=prefix)
    assert parsed["tool_calls"][0]["function"] == {"name": "multiply", "arguments": {"a": 7, "b": 6}}
    assert parse_response(tok, tok("42<|im_end|>", add_special_tokens=False)["input_ids"], prefix=prefix) == {
        "role": "assistant", "content": "42"}  # fmt: skip


def test_guarded_tools_record_failures_and_keep_their_schema(toolmod):
    import pt_toolmod
    from transformers.utils import get_json_schema

    from posttrain.rollout.tools import ToolLog, guard, guarded_environment

    log = ToolLog()
    tool = guard(pt_toolmod.flaky_multiply, log)
    assert get_json_schema(tool) == get_json_schema(pt_toolmod.flaky_multiply)
    assert tool(a=2, b=3) == 6
    with pytest.raises(RuntimeError, match="odd factor 3"):
        tool(a=3, b=3)
    assert log.take() == [{"tool": "flaky_multiply", "arguments": {"a": 3, "b": 3},
                           "error": "RuntimeError: odd factor 3", "message": "odd factor 3"}]  # fmt: skip
    assert log.take() == []
    env = guarded_environment(pt_toolmod.Calculator, log)()
    env.reset()
    assert env.multiply(a=4, b=5) == 20 and env.calls == 1
    with pytest.raises(TypeError):
        env.multiply(a=4)
    assert log.take()[0]["tool"] == "multiply"
    assert get_json_schema(env.multiply)["function"]["name"] == "multiply"


def _tool_batch(trainer, tokenizer):
    """A hand-made batch of 2 rollouts: model tokens, a tool result (tool_mask 0), model tokens; per-token log-probs
    that the test controls (leaf tensors) in place of the model's."""
    import torch

    prompt = tokenizer("<|im_start|>user\n1*2=<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer('<tool_call>{"a":1}</tool_call><|im_end|>\n<|im_start|>tool\n2<|im_end|>\n42<|im_end|>',
                    add_special_tokens=False)["input_ids"]  # fmt: skip
    n = len(ids)
    start = len(tokenizer('<tool_call>{"a":1}</tool_call><|im_end|>\n', add_special_tokens=False)["input_ids"])
    end = n - len(tokenizer("42<|im_end|>", add_special_tokens=False)["input_ids"])
    tool_mask = torch.ones(2, n, dtype=torch.long)
    tool_mask[:, start:end] = 0
    batch = {
        "prompt_ids": torch.tensor([prompt, prompt]), "prompt_mask": torch.ones(2, len(prompt), dtype=torch.long),
        "completion_ids": torch.tensor([ids, ids]), "completion_mask": torch.ones(2, n, dtype=torch.long),
        "tool_mask": tool_mask, "advantages": torch.tensor([1.0, -1.0]),
        "num_items_in_batch": (tool_mask.sum()).float(),
        # NFT's per-rollout fields (posttrain.trainers.nft_trainer): one right answer, one wrong, an informative group
        "nft_correct": torch.tensor([1.0, 0.0]), "nft_rhat": torch.tensor([0.5, 0.5]),
        "nft_informative": torch.tensor([1.0, 1.0]),
    }  # fmt: skip
    return batch, ~tool_mask.bool()  # True at the tool-result tokens


@pytest.mark.parametrize("trainer_name", ["grpo", "nft"])
def test_tool_result_tokens_carry_no_loss(tmp_path, toolmod, trainer_name):
    """Changing the tool results' token values (their log-probs under the policy and the sampler) leaves the gradient
    unchanged, and the gradient at those positions is exactly zero; model tokens after the result still learn."""
    import torch

    from posttrain.registry import trainer_module
    from posttrain.runs import RunDir
    from posttrain.trainers import nft_trainer

    recipe = validate(tmp_path, trainer=trainer_name, rollout="tools: [pt_toolmod:multiply]")
    module = trainer_module(trainer_name)
    trainer, tokenizer = module.build_trainer(recipe, RunDir(tmp_path / "run"), trainer_class=module.trainer_class())
    trainer.nft_options = trainer.dynamic_options = recipe.options  # as nft.train sets them
    batch, tool = _tool_batch(trainer, tokenizer)
    if trainer_name == "nft":
        batch = {**batch, nft_trainer.CORRECT: batch["nft_correct"], nft_trainer.RHAT: batch["nft_rhat"],
                 nft_trainer.INFORMATIVE: batch["nft_informative"]}  # fmt: skip
    torch.manual_seed(0)
    base = -torch.rand(batch["completion_ids"].shape) - 0.5

    def grad_with(logps, old):
        leaf = logps.clone().requires_grad_(True)
        trainer._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros_like(leaf), None)
        trainer.compute_loss(trainer.model, {**batch, "old_per_token_logps": old}).backward()
        return leaf.grad

    grad = grad_with(base, base - 0.1)
    assert grad[tool].abs().max() == 0.0
    assert grad[~tool].abs().min() > 0.0  # every model token, before and after the tool result, is trained
    changed = base.clone()
    changed[tool] = -5.0 * torch.rand(int(tool.sum()))  # other values at the tool-result positions
    old = base - 0.1
    old[tool] = -3.0
    assert torch.equal(grad_with(changed, old), grad)


# ------------------------------------------------------------------------------- training with tools (slow)


@pytest.fixture(scope="session")
def tool_sft_model(tmp_path_factory):
    """A tiny tool-template model SFT'd on tool_arithmetic demonstrations (half call multiply): it calls the tool in
    part of its rollouts, so the tool loop runs from the first step."""
    from posttrain.registry import load_and_validate
    from posttrain.train import train_recipe

    out = tmp_path_factory.mktemp("tool_sft")
    recipe = out / "sft.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tool-sft
        trainer: sft
        model:
          tiny: {{task: text, tools: true, hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128,
                 max_positions: 256}}
        data:
          train: {{synthetic: tool_arithmetic, split: train, n: 2000, tool_rate: 0.5}}
        training:
          max_steps: 120
          per_device_train_batch_size: 32
          learning_rate: 3.0e-3
          lr_scheduler_type: constant
          logging_steps: 20
          save_steps: 1000
        output_dir: {out / "run"}
        """))  # fmt: skip
    train_recipe(load_and_validate(recipe))
    return out / "run" / "final"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trainer_name", "rollout"),
    [
        ("grpo", "tools: [pt_toolmod:flaky_multiply]"),
        ("nft", "environment: pt_toolmod:Calculator"),
        ("rft", "tools: [pt_toolmod:multiply]"),
    ],
)
def test_tool_rollouts_train(tmp_path, toolmod, tool_sft_model, trainer_name, rollout):
    """grpo (with a tool that fails for odd factors), nft (with an environment) and rft (with a tool) each train two
    steps on multi-turn rollouts: the tool is called, the policy moves, the report shows transcripts."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.registry import load_and_validate
    from posttrain.runs import TOOL_FAILURES_FILE, TOOL_TRANSCRIPTS_FILE, RunDir
    from posttrain.train import train_recipe

    # The SFT model was taught to call `multiply`: the flaky stand-in is offered under that name.
    if "flaky" in rollout:
        flaky = TOOL_MODULE[TOOL_MODULE.index("def flaky_multiply") : TOOL_MODULE.index("def no_hints")]
        (tmp_path / "pt_flaky.py").write_text(flaky.replace("def flaky_multiply", "def multiply"))
        rollout = "tools: [pt_flaky:multiply]"
    text = recipe_text(tmp_path, trainer=trainer_name, rollout=rollout + "\n  max_tool_calls: 2",
                       data=None).replace("  tiny: {task: text, tools: true}", f"  path: {tool_sft_model}")  # fmt: skip
    text = text.replace("  - name: numeric_match", "  - name: pt_toolmod:five_digits")
    # Room for a call, its result and the answer (TRL rolls back a tool result that would overflow the budget).
    text = text.replace("max_new_tokens: 64", "max_new_tokens: 128")
    text = text.replace("max_steps: 1", "max_steps: 2\n  learning_rate: 1.0e-3\n  logging_steps: 1")
    if trainer_name != "grpo":
        text = text.replace("rollout:", "algorithm:\n  beta: 0.0\nrollout:")
    (tmp_path / "recipe.yaml").write_text(text)
    chat_rows(tmp_path / "train.jsonl", n=32)
    train_recipe(load_and_validate(tmp_path / "recipe.yaml"))
    run = RunDir(tmp_path / "run")
    steps = [r for r in run.read_metrics() if "tools/call_frequency" in r]
    assert steps and max(r["tools/call_frequency"] for r in steps) > 0
    assert all("tools/turns" in r and "tools/used" in r for r in steps)
    before = AutoModelForCausalLM.from_pretrained(tool_sft_model)
    after = AutoModelForCausalLM.from_pretrained(run.final)
    moved = sum((a - b).abs().sum().item() for a, b in zip(after.parameters(), before.parameters(), strict=True))
    assert moved > 0
    kept = json.loads((run.path / TOOL_TRANSCRIPTS_FILE).read_text())
    shown = [kept[k]["transcript"] for k in ("rewarded", "unrewarded") if kept[k]]
    assert shown and all(t.startswith("user: ") and "\nassistant: " in t for t in shown)
    report = (run.path / "report.md").read_text()
    assert "## Tool-use transcripts" in report
    if "flaky" in rollout or "pt_flaky" in rollout:
        failures = [json.loads(line) for line in (run.path / TOOL_FAILURES_FILE).read_text().splitlines()]
        assert failures and all(f["tool"] == "multiply" and f["error"].startswith("RuntimeError: odd factor")
                                for f in failures)  # fmt: skip
        assert any("transcript" in f and "odd factor" in f["transcript"] for f in failures)
        assert "tool call(s) failed (multiply)" in report
    del torch


def test_the_tool_keys_reach_trls_vllm_path(tmp_path, toolmod):
    """With rollout.backend vllm (not installable here) the same keys reach TRL: tools/environment_factory go to
    GRPOTrainer whatever the backend (its tool loop serves vLLM and transformers alike), max_tool_calls becomes
    GRPOConfig's max_tool_calling_iterations beside use_vllm; the TRL signatures this relies on are pinned."""
    import inspect

    from trl import GRPOConfig, GRPOTrainer

    from posttrain.preflight import MachineError
    from posttrain.rollout.tools import ToolLog, trainer_kwargs
    from posttrain.runs import RunDir
    from posttrain.trainers.base import config_kwargs
    from posttrain.trainers.grpo import rollout_kwargs

    with pytest.raises(MachineError) as err:  # vLLM is missing here: only the machine is refused, not the tools
        validate(tmp_path, rollout="tools: [pt_toolmod:multiply]\n  max_tool_calls: 3\n  backend: vllm")
    recipe = err.value.recipe
    kwargs = rollout_kwargs(recipe)
    assert kwargs["use_vllm"] is True and kwargs["max_tool_calling_iterations"] == 3

    config = GRPOConfig(**config_kwargs(recipe, RunDir(tmp_path / "run")), **kwargs)
    assert config.use_vllm and config.max_tool_calling_iterations == 3
    passed = trainer_kwargs(recipe, ToolLog())
    assert [t.__name__ for t in passed["tools"]] == ["multiply"]
    params = inspect.signature(GRPOTrainer.__init__).parameters
    assert {"tools", "environment_factory"} <= set(params)
    loop = inspect.getsource(GRPOTrainer._tool_call_loop)
    assert "self.use_vllm" in loop and "tool_mask" in loop  # one loop for both backends, tool results masked


class ScriptedGenerator:
    """A stand-in policy: asks multiply(a, b) for `a*b=` until a tool result is in its prompt, then answers with the
    last tool result (or "0" for problems it answers without the tool: a in `direct`)."""

    def __init__(self, direct=()):
        self.direct, self.seen = set(direct), []

    def generate(self, prompts, params):
        import re

        out = []
        for text in prompts:
            self.seen.append(text)
            a, b = map(int, re.search(r"user\n(\d+)\*(\d+)=", text).groups())
            results = re.findall(r"<\|im_start\|>tool\n(.*?)<\|im_end\|>", text)
            if a in self.direct:
                out.append(["0"])
            elif results:
                out.append([results[-1]])
            else:
                out.append([f'<tool_call>{{"name":"multiply","arguments":{{"a":{a},"b":{b}}}}}</tool_call>'])
        return out


def test_an_unknown_tool_is_recognised_in_the_words_trl_writes():
    """tool_failures.jsonl names calls of tools that do not exist by reading TRL's tool-result text: pinned here
    against GRPOTrainer's source (the error it raises, the dict it keeps, the str() it sends), not only by the slow
    training test."""
    import inspect

    from trl import GRPOTrainer

    from posttrain.trainers.tool_rollouts import _unknown_calls

    source = inspect.getsource(GRPOTrainer)
    assert 'raise ValueError(f"Tool {name} not found.")' in source
    assert 'result = {"error": str(e)}' in source and "else str(result)" in source
    trl_content = str({"error": str(ValueError("Tool divide not found."))})  # what the model is shown
    transcript = [{"role": "assistant", "content": "..."}, {"role": "tool", "name": "divide", "content": trl_content},
                  {"role": "tool", "name": "multiply", "content": "42"}]  # fmt: skip
    assert _unknown_calls([transcript, "plain text completion"]) == ["divide"]


def test_held_out_evaluation_runs_the_tool_loop_and_reports_tool_use(tmp_path):
    """evaluate() through ToolLoopGenerator: tools rendered into the prompt, calls parsed and run, the final turn
    graded; accuracy, tool-use rate and calls per sample match the scripted policy; transcripts kept."""
    from datasets import Dataset

    from posttrain.data.tool_arithmetic import multiply
    from posttrain.evaluation.benchmarks import Benchmark
    from posttrain.evaluation.runner import evaluate
    from posttrain.models.tiny import build_tokenizer
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.tool_loop import ToolLoopGenerator

    tok = build_tokenizer("text", tools=True)
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}*{b}="}], "answer": str(a * b)}
                              for a, b in ((123, 45), (200, 11), (999, 99), (101, 10))])  # fmt: skip
    inner = ScriptedGenerator(direct={101})
    generator = ToolLoopGenerator(inner, tok, [multiply], max_rounds=2)
    bench = Benchmark(name="tools", rows=rows, grader="numeric_match", params=SamplingParams(max_new_tokens=128, temperature=0))  # fmt: skip
    result = evaluate(generator, bench, tok)
    assert result.accuracy == 0.75  # 101*10 answered "0" without the tool
    assert result.extra["tool_use_rate"] == 0.75 and result.extra["tool_calls"] == 0.75
    assert all(t.startswith("<|im_start|>system\ntools: multiply<|im_end|>\n") for t in inner.seen)
    first = result.samples[0]["transcript"]
    assert [m["role"] for m in first] == ["assistant", "tool", "assistant"]
    assert first[1] == {"role": "tool", "name": "multiply", "content": "5535"} and first[2]["content"] == "5535"


def test_the_tool_loop_budget_covers_the_whole_completion_as_in_trl():
    """max_new_tokens bounds every turn and tool result after the prompt together: a later turn is cut to what is
    left, and tool results that would overflow are dropped and the rollout ends on its calling turn."""
    from posttrain.data.tool_arithmetic import multiply
    from posttrain.models.tiny import build_tokenizer
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.tool_loop import ToolLoopGenerator

    tok = build_tokenizer("text", tools=True)
    prompt = [{"role": "user", "content": "123*45="}]
    call = '<tool_call>{"name":"multiply","arguments":{"a":123,"b":45}}</tool_call>'

    def used_after(turns):  # tokens after the prompt, as the loop measures them
        loop = ToolLoopGenerator(None, tok, [multiply])
        return len(loop._tokens(loop._text(prompt + turns))) - len(loop._tokens(loop._text(prompt)))

    with_result = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "multiply", "arguments": {"a": 123, "b": 45}}}]}, {"role": "tool", "name": "multiply", "content": "5535"}]  # fmt: skip
    need = used_after(with_result)
    inner = ScriptedGenerator()
    loop = ToolLoopGenerator(inner, tok, [multiply], max_rounds=3)
    [[answer]] = loop.generate([prompt], SamplingParams(max_new_tokens=need + 2, temperature=0))
    assert answer == "55"  # the echoed "5535" cut to the 2 tokens left
    assert loop.last_transcripts[0][1] == {"role": "tool", "name": "multiply", "content": "5535"}
    inner = ScriptedGenerator()
    loop = ToolLoopGenerator(inner, tok, [multiply], max_rounds=3)
    [[answer]] = loop.generate([prompt], SamplingParams(max_new_tokens=need - 1, temperature=0))
    assert len(inner.seen) == 1 and [m["role"] for m in loop.last_transcripts[0]] == ["assistant"]  # result dropped
    assert loop.last_tool_calls == [1] and call not in answer


def test_each_sample_gets_its_own_environment_reset_with_its_row():
    """With rollout.environment the held-out loop makes one instance per sample, resets it with the row's fields
    (TRL's reset(**row)), appends the observation to the last user message, and routes named environments by the
    row's `environment` column (not forwarded to reset)."""
    from datasets import Dataset

    from posttrain.evaluation.benchmarks import Benchmark
    from posttrain.evaluation.runner import evaluate
    from posttrain.models.tiny import build_tokenizer
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.tool_loop import ToolLoopGenerator

    made = []

    class Calculator:
        def reset(self, **row):
            self.row, self.calls = row, 0
            made.append(self)
            return " (use the tool)"

        def multiply(self, a: int, b: int) -> int:
            """Multiply two integers.

            Args:
                a: The first factor.
                b: The second factor.
            """
            self.calls += 1
            return a * b

    class Broken(Calculator):
        def multiply(self, a: int, b: int) -> int:
            """Always wrong.

            Args:
                a: The first factor.
                b: The second factor.
            """
            self.calls += 1
            return 0

    tok = build_tokenizer("text", tools=True)
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}*{b}="}], "answer": str(a * b), "environment": e}
                              for a, b, e in ((123, 45, "good"), (200, 11, "bad"), (999, 99, "good"))])  # fmt: skip
    inner = ScriptedGenerator()
    loop = ToolLoopGenerator(inner, tok, [], max_rounds=2, environments={"good": Calculator, "bad": Broken})
    bench = Benchmark(name="env", rows=rows, grader="numeric_match", params=SamplingParams(n=2, max_new_tokens=128, temperature=0))  # fmt: skip
    result = evaluate(loop, bench, tok)
    assert len(made) == 6 and all(m.calls == 1 for m in made)  # one instance per sample, each called once
    assert [type(m).__name__ for m in made] == ["Calculator"] * 2 + ["Broken"] * 2 + ["Calculator"] * 2
    assert made[0].row == {"prompt": [{"role": "user", "content": "123*45="}], "answer": "5535"}
    assert "user\n123*45= (use the tool)<|im_end|>" in inner.seen[0]
    assert result.accuracy == pytest.approx(2 / 3)  # the broken environment's answers are wrong
    single = ToolLoopGenerator(ScriptedGenerator(), tok, [], environments={None: Calculator})
    made.clear()
    assert single.generate([[{"role": "user", "content": "12*34="}]], SamplingParams(temperature=0)) == [["408"]]
    assert made[0].row == {}  # no rows bound (a bare generate): reset() without fields


def write_tool_suite(tmp_path, generation: dict, prompt: dict | None = None, name: str = "suite.yaml"):
    rows = [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a, b in ((123, 45), (200, 11), (101, 10))]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = {"name": "tools", "version": "1", "benchmarks": [{
        "name": "calc", "data": {"path": "rows.jsonl"}, "grader": "numeric_match",
        "prompt": {"chat_template": True} if prompt is None else prompt,
        "generation": {"max_new_tokens": 128, **generation}}]}  # fmt: skip
    import yaml

    (tmp_path / name).write_text(yaml.safe_dump(suite))
    return tmp_path / name


def test_a_suite_benchmark_answers_through_the_tool_loop(tmp_path):
    """`posttrain eval --suite` with generation.tools: the model answers through the tool loop, tool use reaches the
    store, and the tools enter the settings hash (a tool-less run of the same benchmark is another result)."""
    from posttrain.evaluation.store import ResultsStore
    from posttrain.evaluation.suite_runner import run_suite
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer("text", tools=True)
    store = ResultsStore(tmp_path / "r.db")
    path = write_tool_suite(tmp_path, {"tools": ["posttrain.data.tool_arithmetic:multiply"], "max_tool_calls": 1})
    inner = ScriptedGenerator(direct={101})
    [outcome] = run_suite("stand-in/model", path, store=store, samples_dir=tmp_path / "s", generator=inner, tokenizer=tok)
    metrics = outcome.record.metrics
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["tool_use_rate"] == pytest.approx(2 / 3)
    assert all(t.startswith("<|im_start|>system\ntools: multiply<|im_end|>") for t in inner.seen)
    plain = write_tool_suite(tmp_path, {}, name="plain.yaml")  # the same rows and prompts, no tools
    [other] = run_suite("stand-in/model", plain, store=store, samples_dir=tmp_path / "s",
                        generator=ScriptedGenerator(direct={101, 123, 200}), tokenizer=tok)  # fmt: skip
    assert other.record.settings_hash != outcome.record.settings_hash and "tool_use_rate" not in other.record.metrics


@pytest.mark.parametrize(
    ("generation", "prompt", "message"),
    [
        ({"tools": ["posttrain.data.tool_arithmetic:multiply"]}, {}, "generation.tools needs prompt.chat_template: true"),
        ({"tools": ["pt_nosuchmodule:f"]}, None, "generation.tools\\[0\\]: cannot import module 'pt_nosuchmodule'"),
        ({"max_tool_calls": 2}, None, "generation.max_tool_calls needs generation.tools"),
        ({"tools": "posttrain.data.tool_arithmetic:multiply"}, None, "generation.tools must be a list"),
        ({"tool": ["x:y"]}, None, "unknown key 'tool'"),
    ],
)  # fmt: skip
def test_a_suites_tools_are_checked_before_any_model_loads(tmp_path, no_models, generation, prompt, message):
    from posttrain.errors import PosttrainError
    from posttrain.evaluation.store import ResultsStore
    from posttrain.evaluation.suite_runner import run_suite

    path = write_tool_suite(tmp_path, generation, prompt)
    with pytest.raises(PosttrainError, match=message):
        run_suite("stand-in/model", path, store=ResultsStore(tmp_path / "r.db"), samples_dir=tmp_path / "s")


def test_tool_loop_caps_rounds_and_hands_errors_to_the_model():
    from posttrain.models.tiny import build_tokenizer
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.tool_loop import ToolLoopGenerator

    def multiply(a: int, b: int) -> int:
        """Fails.

        Args:
            a: a
            b: b
        """
        raise RuntimeError("calculator broken")

    tok = build_tokenizer("text", tools=True)
    inner = ScriptedGenerator()
    generator = ToolLoopGenerator(inner, tok, [multiply], max_rounds=1)
    [[answer]] = generator.generate([[{"role": "user", "content": "12*34="}]], SamplingParams(temperature=0))
    assert generator.last_tool_calls == [1] and len(inner.seen) == 2
    assert "{'error': 'calculator broken'}" in inner.seen[1]
    assert answer == "{'error': 'calculator broken'}"  # the policy echoed the last tool result


def test_the_tools_quickstart_is_wired_to_shipped_recipes_that_validate(tmp_path):
    """`posttrain quickstart --task tools`: its recipes are shipped and validate (the RL ones from the SFT stage's
    output), and its table shows accuracy and tool use."""
    from posttrain.quickstart import RECIPES, TASKS, QuickstartSummary
    from posttrain.registry import load_and_validate

    task = TASKS["tools"]
    small = ["data.train.n=64", "data.eval.n=8"]  # the whole split is ~77k rows: seconds to build
    sft = load_and_validate(RECIPES / task.sft, [*small, f"output_dir={tmp_path / 'sft'}"])
    assert sft.eval.tools == ["posttrain.data.tool_arithmetic:multiply"]
    from posttrain.models.tiny import save_family_model

    final, _ = save_family_model(tmp_path / "sft" / "final", "llama", tools=True)  # what the SFT stage leaves
    for _, recipe, stage in task.rl:
        rl = load_and_validate(RECIPES / recipe, [*small, f"model.path={final}", f"output_dir={tmp_path / stage}"])
        assert rl.rollout.tools == ["posttrain.data.tool_arithmetic:multiply"] and rl.trainer in ("grpo", "nft")
    summary = QuickstartSummary(seed=0, task="tools", accuracy={"SFT": {"eval/tools/accuracy": 0.25,
                                "eval/tools/tool_use_rate": 0.5}}, seconds={"SFT": 10.0})  # fmt: skip
    assert summary.table().splitlines()[0] == "| model | accuracy | tool use | train s |"
    assert "| SFT | 0.250 | 0.500 | 10 |" in summary.table()


def test_run_python_is_a_tool_the_loop_calls_in_the_sandbox():
    """reward_models.code_exec:run_python passes the tool checks and runs model-written code in the sandbox when the
    tool loop calls it (an error is the tool's result, the loop goes on)."""
    from posttrain.models.tiny import build_tokenizer
    from posttrain.rollout.tool_loop import ToolLoopGenerator
    from posttrain.rollout.tools import import_ref, tool_problem

    run_python = import_ref("reward_models.code_exec:run_python", "rollout.tools[0]")
    assert tool_problem(run_python) is None
    loop = ToolLoopGenerator(None, build_tokenizer("text", tools=True), [run_python])
    assert loop._call({"function": {"name": "run_python", "arguments": {"code": "print(6 * 7)"}}}) == ("run_python", "42")
    name, result = loop._call({"function": {"name": "run_python", "arguments": {"code": "import posttrain"}}})
    assert name == "run_python" and "ModuleNotFoundError" in str(result)
