"""Held-out evaluation of a tool-using policy: the multi-turn loop TRL runs in training, for posttrain's generators.

TRL's tool loop lives inside GRPOTrainer's private generation; evaluation (before/after training, every
`eval.every_steps`, `posttrain eval`) generates through posttrain's `Generator`s. `ToolLoopGenerator` wraps one:
each round renders every unfinished conversation with the tools (the chat template lists them, as in training),
generates one assistant turn, parses it with the tokenizer's response template, calls the tools it asks for (an
error becomes the tool's result, `{'error': ...}`, as in TRL) and goes on, up to `max_rounds` tool-calling rounds.
The completion graded is the last assistant turn's text; each sample's calls and transcript are kept
(`last_tool_calls`, `last_transcripts`) for the tool-use rate the evaluation reports.

As in TRL, `max_new_tokens` is the budget of the whole completion: every assistant turn and tool result after the
prompt counts against it (measured on the re-rendered conversation; TRL counts the ids it concatenates), a turn is
cut to what is left, and tool results that would overflow it are dropped and the rollout ends on its last turn.
With `rollout.environment`, each sample gets its own instance, reset with its row's fields (`bind_rows`), and the
observation `reset` returns is appended to the last user message, as TRL does per rollout.
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
    """A `Generator` over message-list prompts that runs the tool loop on top of `inner` (any Generator).

    `tools`: functions every sample may call; `environments`: {name or None: class}, one instance per sample whose
    public methods are further tools (None serves every row; a name, the rows whose `environment` column says it)."""

    def __init__(self, inner: Any, tokenizer: Any, tools: list[Callable], max_rounds: int | None = None,
                 environments: dict[str | None, type] | None = None):  # fmt: skip
        self.inner = inner
        self.tokenizer = with_response_template(tokenizer)
        self.tools = list(tools)
        self.by_name = {tool.__name__: tool for tool in self.tools}
        self.environments = dict(environments or {})
        self.max_rounds = 4 if max_rounds is None else max_rounds  # unbounded in TRL; a held-out eval must end
        self.rows: list[dict[str, Any]] | None = None
        self.last_tool_calls: list[int] = []
        self.last_transcripts: list[list[dict[str, Any]]] = []

    def render(self, prompt: Any) -> Any:
        """Prompts stay message lists: each round renders them with the tools (`evaluate` asks before rendering)."""
        return prompt

    def bind_rows(self, rows: list[dict[str, Any]]) -> None:
        """The benchmark rows of the next `generate` call's prompts, in order: an environment is reset with them."""
        self.rows = rows

    def _text(self, messages: list[dict[str, Any]], tools: list[Callable] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=(self.tools if tools is None else tools) or None, tokenize=False, add_generation_prompt=True
        )

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _call(self, call: dict[str, Any], by_name: dict[str, Callable] | None = None) -> tuple[str, Any]:
        function = call.get("function", call)
        name = function.get("name", "unknown")
        by_name = self.by_name if by_name is None else by_name
        try:
            if name not in by_name:
                raise ValueError(f"Tool {name} not found.")
            return name, by_name[name](**(function.get("arguments") or {}))
        except Exception as err:  # noqa: BLE001 - the model sees the error, as in TRL's loop
            return name, {"error": str(err)}

    def _episode(self, prompt: Any, row: dict[str, Any] | None) -> tuple[list[dict[str, Any]], list[Callable]]:
        """A sample's starting conversation and tools: with an environment, a fresh instance reset with the row's
        fields (TRL: `reset(**row)`, the `environment` column not forwarded) and its observation appended."""
        messages = [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if not self.environments:
            return messages, self.tools
        from posttrain.rollout.tools import environment_tools

        row = dict(row or {})
        name = None if None in self.environments else row.pop("environment", None)
        if name not in self.environments:
            raise ValueError(f"no rollout.environment named {name!r} for this row (known: {list(self.environments)})")
        instance = self.environments[name]()
        observation = instance.reset(**row)
        if isinstance(observation, str) and isinstance(messages[-1].get("content"), str):
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
        return messages, self.tools + [getattr(instance, m) for m in environment_tools(type(instance))]

    def generate_samples(self, prompts: list[Any], params: SamplingParams) -> list[list[Sample]]:
        n = params.n
        rows = self.rows if self.rows is not None and len(self.rows) == len(prompts) else [None] * len(prompts)
        episodes = [self._episode(p, row) for p, row in zip(prompts, rows, strict=True) for _ in range(n)]
        conversations = [messages for messages, _ in episodes]
        tools = [t for _, t in episodes]
        start = [len(c) for c in conversations]
        base = [len(self._tokens(self._text(c, t))) for c, t in zip(conversations, tools, strict=True)]
        left = [params.max_new_tokens] * len(conversations)
        calls = [0] * len(conversations)
        finals = [""] * len(conversations)
        active = list(range(len(conversations)))
        for round_ in range(self.max_rounds + 1):
            if not active:
                break
            texts = [self._text(conversations[i], tools[i]) for i in active]
            budget = max(left[i] for i in active)
            outs = self.inner.generate(texts, dataclasses.replace(params, n=1, logprobs=False, max_new_tokens=budget,
                                                                  seed=params.seed + round_))  # fmt: skip
            still = []
            for i, text, out in zip(active, texts, outs, strict=True):
                turn = self._parse(self._cut(out[0], left[i]), text)
                conversations[i].append(turn)
                finals[i] = turn.get("content") or ""
                if turn.get("tool_calls") and round_ < self.max_rounds:
                    calls[i] += len(turn["tool_calls"])
                    by_name = {tool.__name__: tool for tool in tools[i]}
                    results = [self._call(call, by_name) for call in turn["tool_calls"]]
                    conversations[i] += [{"role": "tool", "name": k, "content": str(v)} for k, v in results]
                    used = len(self._tokens(self._text(conversations[i], tools[i]))) - base[i]
                    if used >= params.max_new_tokens:  # TRL drops the results that overflow and ends the rollout
                        del conversations[i][-len(results) :]
                        continue
                    left[i] = params.max_new_tokens - used
                    still.append(i)
            active = still
        self.rows = None
        self.last_tool_calls = calls
        self.last_transcripts = [c[s:] for c, s in zip(conversations, start, strict=True)]
        samples = [Sample(text) for text in finals]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _cut(self, generated: str, budget: int) -> str:
        """A turn generated with the batch's largest budget, cut to this sample's (a sampled prefix is a sample)."""
        ids = self._tokens(generated)
        return generated if len(ids) <= budget else self.tokenizer.decode(ids[:budget])

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
