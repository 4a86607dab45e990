"""Held-out evaluation of a tool-using policy: the multi-turn loop TRL runs in training, for posttrain's generators.

TRL's tool loop lives inside GRPOTrainer's private generation; evaluation (before/after training, every
`eval.every_steps`, `posttrain eval`) generates through posttrain's `Generator`s. `ToolLoopGenerator` wraps one:
each round renders every unfinished conversation with the tools (the chat template lists them, as in training),
generates one assistant turn, parses it with the tokenizer's response template, calls the tools it asks for (an
error becomes the tool's result, `{'error': ...}`, as in TRL) and goes on, up to `max_rounds` tool-calling rounds.
The completion graded is the last assistant turn's text; each sample's calls and transcript are kept
(`last_tool_calls`, `last_transcripts`) for the tool-use rate the evaluation reports.

Each turn gets `max_new_tokens` of its own (TRL's budget covers all turns of a rollout together).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from posttrain.rollout import Sample, SamplingParams


def with_response_template(tokenizer: Any) -> Any:
    """A tokenizer that can parse tool calls: itself when it has a response template, else a copy with the one TRL
    knows for its chat template (ValueError when TRL knows none; validation refuses such recipes first)."""
    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
        return tokenizer
    from trl.chat_template_utils import add_response_schema

    return add_response_schema(copy.deepcopy(tokenizer))


class ToolLoopGenerator:
    """A `Generator` over message-list prompts that runs the tool loop on top of `inner` (any Generator)."""

    def __init__(self, inner: Any, tokenizer: Any, tools: list[Callable], max_rounds: int | None = None):
        self.inner = inner
        self.tokenizer = with_response_template(tokenizer)
        self.tools = list(tools)
        self.by_name = {tool.__name__: tool for tool in self.tools}
        self.max_rounds = 4 if max_rounds is None else max_rounds  # unbounded in TRL; a held-out eval must end
        self.last_tool_calls: list[int] = []
        self.last_transcripts: list[list[dict[str, Any]]] = []

    def render(self, prompt: Any) -> Any:
        """Prompts stay message lists: each round renders them with the tools (`evaluate` asks before rendering)."""
        return prompt

    def _text(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=self.tools or None, tokenize=False, add_generation_prompt=True
        )

    def _call(self, call: dict[str, Any]) -> tuple[str, Any]:
        function = call.get("function", call)
        name = function.get("name", "unknown")
        try:
            if name not in self.by_name:
                raise ValueError(f"Tool {name} not found.")
            return name, self.by_name[name](**(function.get("arguments") or {}))
        except Exception as err:  # noqa: BLE001 - the model sees the error, as in TRL's loop
            return name, {"error": str(err)}

    def generate_samples(self, prompts: list[Any], params: SamplingParams) -> list[list[Sample]]:
        n = params.n
        conversations = [[dict(m) for m in p] if isinstance(p, list) else [{"role": "user", "content": str(p)}]
                         for p in prompts for _ in range(n)]  # fmt: skip
        start = [len(c) for c in conversations]
        calls = [0] * len(conversations)
        finals = [""] * len(conversations)
        active = list(range(len(conversations)))
        one = dataclasses.replace(params, n=1, logprobs=False)
        for round_ in range(self.max_rounds + 1):
            if not active:
                break
            texts = [self._text(conversations[i]) for i in active]
            outs = self.inner.generate(texts, dataclasses.replace(one, seed=params.seed + round_))
            still = []
            for i, text, out in zip(active, texts, outs, strict=True):
                turn = self._parse(out[0], text)
                conversations[i].append(turn)
                finals[i] = turn.get("content") or ""
                if turn.get("tool_calls") and round_ < self.max_rounds:
                    for call in turn["tool_calls"]:
                        calls[i] += 1
                        name, result = self._call(call)
                        conversations[i].append({"role": "tool", "name": name, "content": str(result)})
                    still.append(i)
            active = still
        self.last_tool_calls = calls
        self.last_transcripts = [c[s:] for c, s in zip(conversations, start, strict=True)]
        samples = [Sample(text) for text in finals]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def generate(self, prompts: list[Any], params: SamplingParams) -> list[list[str]]:
        return [[s.text for s in group] for group in self.generate_samples(prompts, params)]

    def _parse(self, generated: str, prompt_text: str) -> dict[str, Any]:
        """The assistant turn `generated` as a message (plain text when it does not parse)."""
        eos = self.tokenizer.eos_token or ""
        try:
            message = self.tokenizer.parse_response(generated + eos, prefix=prompt_text)
        except Exception:  # noqa: BLE001 - an unparseable turn is a text answer, as in TRL
            return {"role": "assistant", "content": generated}
        return {"role": "assistant", **{k: v for k, v in dict(message).items() if k != "role"}}


def tool_use_metrics(generator: Any, n: int) -> dict[str, float]:
    """What a held-out evaluation adds for a tool loop: the share of samples that called a tool, calls per sample."""
    calls = getattr(generator, "last_tool_calls", None)
    if not calls:
        return {}
    return {"tool_use_rate": sum(c > 0 for c in calls) / len(calls), "tool_calls": sum(calls) / len(calls)}
