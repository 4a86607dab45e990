"""What a multi-turn tool rollout did, observed on top of TRL's tool loop (GRPOTrainer and NFT's subclass).

TRL logs `tools/call_frequency` (calls per rollout) and `tools/failure_frequency` (failed / all calls). This mixin
adds, from the rollouts TRL keeps for logging (`self._logs`, gathered over processes):
- `tools/turns`: assistant turns per rollout (1 + the rounds in which it called a tool) and `tools/used`: the share of
  rollouts with at least one call, both in metrics.jsonl, the trackers and the progress bar;
- the latest rewarded and unrewarded transcripts, kept in the run dir for the report (runs.TOOL_TRANSCRIPTS_FILE);
- each tool failure tied to its sample: the tool's name, arguments and error, with the prompt and the transcript
  the model saw the error in (runs.TOOL_FAILURES_FILE, and a warning for the first few).

It reads TRL's private `_logs` / `_metrics` and overrides `_generate_and_score_completions`: pinned by
tests/test_tools.py."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from posttrain.runs import TOOL_FAILURES_FILE, TOOL_TRANSCRIPTS_FILE, write_atomic

logger = logging.getLogger(__name__)

WARNED_FAILURES = 5  # failures printed as warnings per process; all go to the run dir's file


def render_transcript(prompt: Any, completion: Any) -> str:
    """A conversation as plain lines: `role: content`, tool calls as `name(arguments)`."""
    lines = []
    for message in [
        *(prompt if isinstance(prompt, list) else []),
        *(completion if isinstance(completion, list) else []),
    ]:
        if not isinstance(message, dict):
            continue
        text = message.get("content") or ""
        if isinstance(text, list):  # multimodal blocks
            text = " ".join(str(part.get("text", "")) for part in text if isinstance(part, dict))
        calls = [
            f"{c.get('function', c).get('name')}({json.dumps(c.get('function', c).get('arguments'))})"
            for c in message.get("tool_calls") or []
            if isinstance(c, dict)
        ]
        lines.append(f"{message.get('role')}: {text}{' -> call ' + ', '.join(calls) if calls else ''}")
    if not isinstance(prompt, list):
        lines.insert(0, f"prompt: {prompt}")
    if not isinstance(completion, list):
        lines.append(f"completion: {completion}")
    return "\n".join(lines)


def turns_of(completion: Any) -> int:
    return sum(1 for m in completion if isinstance(m, dict) and m.get("role") == "assistant") if isinstance(completion, list) else 1  # fmt: skip


def calls_tool(completion: Any) -> bool:
    return isinstance(completion, list) and any(isinstance(m, dict) and m.get("tool_calls") for m in completion)


class ToolRolloutMixin:
    """Put first in the bases of a GRPOTrainer family class; `build_trainer` sets `tool_log` and `tool_run_dir`."""

    tool_log: Any = None
    tool_run_dir: Any = None
    _tool_warned = 0

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if getattr(self, "tools", None) and self.tool_run_dir is not None:
            self._observe_tools(len(output["completion_ids"]) * self.accelerator.num_processes)
        return output

    def _latest(self, n: int) -> tuple[list, list, list[float]]:
        """The last generation's n rollouts (all processes): prompts, completions, weighted total rewards."""
        prompts, completions = list(self._logs["prompt"])[-n:], list(self._logs["completion"])[-n:]
        weights = [float(w) for w in self.reward_weights]
        totals = [0.0] * len(completions)
        for weight, name in zip(weights, self.reward_func_names, strict=False):
            values = list(self._logs["rewards"][name])[-len(completions) :]
            for i, v in enumerate(values):
                totals[i] += 0.0 if v is None or math.isnan(v) else weight * v
        return prompts, completions, totals

    def _observe_tools(self, n: int) -> None:
        prompts, completions, rewards = self._latest(n)
        if not completions:
            return
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["tools/turns"].append(sum(map(turns_of, completions)) / len(completions))
        self._metrics[mode]["tools/used"].append(sum(map(calls_tool, completions)) / len(completions))
        if self.accelerator.is_main_process:
            self._keep_examples(prompts, completions, rewards)
        self._report_failures(prompts, completions)

    def _keep_examples(self, prompts: list, completions: list, rewards: list[float]) -> None:
        """The latest rewarded (reward > 0) and unrewarded (<= 0) transcripts, those that called a tool first; a
        generation without one of the kinds keeps the earlier example of that kind."""
        kept = getattr(self, "_tool_examples", None) or {"rewarded": None, "unrewarded": None}
        for kind, wanted in (("rewarded", lambda r: r > 0), ("unrewarded", lambda r: r <= 0)):
            pick = [i for i in range(len(completions)) if wanted(rewards[i])]
            if not pick:
                continue
            sign = -1 if kind == "rewarded" else 1
            i = min(pick, key=lambda j: (not calls_tool(completions[j]), sign * rewards[j]))
            kept[kind] = {"step": self.state.global_step, "reward": rewards[i], "turns": turns_of(completions[i]),
                          "transcript": render_transcript(prompts[i], completions[i])}  # fmt: skip
        self._tool_examples = kept
        write_atomic(self.tool_run_dir / TOOL_TRANSCRIPTS_FILE, json.dumps(kept, indent=1))

    def _report_failures(self, prompts: list, completions: list) -> None:
        failures = self.tool_log.take() if self.tool_log is not None else []
        if self.accelerator.is_main_process:  # calls of a tool that does not exist never reach a tool's guard
            failures += [{"tool": name, "arguments": None, "error": f"no tool named {name!r} (the model called it)",
                          "message": f"Tool {name} not found."} for name in _unknown_calls(completions)]  # fmt: skip
        if not failures:
            return
        lines = []
        for failure in failures:
            sample = _sample_of(failure, completions)
            record = {"step": self.state.global_step, "process": self.accelerator.process_index, **failure}
            record.pop("message")
            if sample is not None:
                record["prompt"] = render_transcript(prompts[sample], [])
                record["transcript"] = render_transcript([], completions[sample])
            lines.append(json.dumps(record, default=str))
            if self._tool_warned < WARNED_FAILURES:
                self._tool_warned += 1
                where = f" in the sample {record['prompt']!r}" if "prompt" in record else ""
                logger.warning(
                    "tool %s(%s) raised %s%s; the model sees the error and the rollout goes on (all failures: %s)",
                    record["tool"], json.dumps(record["arguments"], default=str), record["error"], where,
                    self.tool_run_dir / TOOL_FAILURES_FILE,
                )  # fmt: skip
        with open(self.tool_run_dir / TOOL_FAILURES_FILE, "a") as f:  # appends: one line per failure, any process
            f.write("".join(line + "\n" for line in lines))


def _unknown_calls(completions: list) -> list[str]:
    """The names of tools the model called that do not exist (TRL answers `{'error': 'Tool X not found.'}`)."""
    names = []
    for completion in completions:
        for message in completion if isinstance(completion, list) else []:
            if not isinstance(message, dict):
                continue
            content = str(message.get("content"))
            if (
                message.get("role") == "tool"
                and content.startswith("{'error': 'Tool ")
                and content.endswith(" not found.'}")
            ):
                names.append(content[len("{'error': 'Tool ") : -len(" not found.'}")])
    return names


def _sample_of(failure: dict[str, Any], completions: list) -> int | None:
    """The rollout whose transcript holds this failure's error as the tool's result (TRL writes {'error': str(e)})."""
    for i, completion in enumerate(completions):
        for message in completion if isinstance(completion, list) else []:
            if (
                isinstance(message, dict)
                and message.get("role") == "tool"
                and message.get("name") == failure["tool"]
                and failure["message"] in str(message.get("content"))
            ):
                return i
    return None
