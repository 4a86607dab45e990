"""The `code_exec` reward and the `run_python` tool: run a completion's Python against the row's tests in a sandbox.

A sample scores 1.0 when its program and then the row's tests (Python source with asserts, the `tests` column) run
to the end and exit 0 within the limits, else 0.0, with a reason ("timeout (wall 2.0 s)", "memory limit (256 MB)",
"exit 1: AssertionError (tests.py line 2: assert f(2) == 4)", "no code", ...). Each sample is one process; samples
run in parallel (a thread pool driving subprocesses). docs/code_exec.md has the catalogue of hostile programs and what
each backend does with them.

The sandbox itself (the limits, the bwrap and fallback backends and their probe, the uid drop, `run_sandboxed`,
`run_batch`, `Outcome`) is `reward_models.sandbox`; its public names are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from reward_models.errors import RewardError
from reward_models.registry import register, text_of
from reward_models.sandbox import (
    Backend,
    Limits,
    Outcome,
    SandboxError,
    run_batch,
    run_sandboxed,
    sandbox_backend,
)

_TOOL_OUTPUT_CHARS = 4000


# ---- extracting the program -------------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
_OPEN_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n", re.MULTILINE)
_PYTHON_TAGS = ("python", "py", "python3", "")


def extract_code(completion: Any) -> str:
    """The program in a completion: the last ```python (or bare ```) fenced block; a final block cut short by the
    token limit (no closing fence) counts; without any fence, the whole completion. Fences in other languages only:
    no code (""). Completions may be strings or TRL's conversational message lists."""
    text = text_of(completion)
    blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in _PYTHON_TAGS]
    last_closed_end = max((m.end() for m in _FENCE.finditer(text)), default=0)
    opened = [m for m in _OPEN_FENCE.finditer(text, last_closed_end) if m.group(1).lower() in _PYTHON_TAGS]
    if opened:  # an unclosed block after every closed one: the generation stopped inside it
        return text[opened[-1].end() :]
    if blocks:
        return blocks[-1]
    return "" if "```" in text else text


@register("code_exec", column_options=("tests_column",))
def code_exec_reward(
    prompts: list[Any],
    completions: list[Any],
    *,
    tests_column: str = "tests",
    cpu_seconds: float = Limits.cpu_seconds,
    wall_seconds: float = Limits.wall_seconds,
    memory_mb: int = Limits.memory_mb,
    max_processes: int = Limits.max_processes,
    max_output_bytes: int = Limits.max_output_bytes,
    max_file_mb: int = Limits.max_file_mb,
    max_parallel: int | None = None,
    hide: Sequence[str] = (),
    backend: str = "auto",
    **columns: Any,
) -> list[float | None]:
    """1.0 when the completion's program (`extract_code`) and then the row's tests (`tests_column`: Python source
    with asserts; HumanEval-style `check(candidate)` too when the row has an `entry_point` column) exit 0 in the
    sandbox within the limits, else 0.0; None for a row whose tests are None. Options: the `Limits` fields and the
    sandbox `backend` ("auto", "bwrap", "fallback"). Logs each sample's reason (`code_exec_reason`) and the backend
    (`code_exec/bwrap`: 1.0 under bubblewrap, 0.0 under the fallback) through TRL's `log_extra`/`log_metric`."""
    if tests_column not in columns:
        raise RewardError(
            f"reward 'code_exec' needs the dataset column '{tests_column}' (Python tests run after each program); "
            f"columns passed: {', '.join(sorted(c for c in columns if not c.startswith('log_'))) or 'none'} "
            "(set kwargs.tests_column)"
        )
    tests, n = list(columns[tests_column]), len(completions)
    if len(tests) != n:
        raise RewardError(f"reward 'code_exec': got {len(tests)} tests for {n} completions")
    for i, test in enumerate(tests):
        if test is not None and not (isinstance(test, str) and test.strip()):
            raise RewardError(f"reward 'code_exec': row {i} has empty or non-string tests ({test!r}); every "
                              "program would pass")  # fmt: skip
    entry = columns.get("entry_point")
    entries = list(entry) if isinstance(entry, (list, tuple)) else [entry] * n
    limits = Limits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_mb=memory_mb,
                    max_processes=max_processes, max_output_bytes=max_output_bytes, max_file_mb=max_file_mb,
                    hide=tuple(hide), **({"max_parallel": max_parallel} if max_parallel else {}))  # fmt: skip
    chosen = sandbox_backend(backend)
    todo = [i for i in range(n) if tests[i] is not None]
    outcomes = run_batch([extract_code(completions[i]) for i in todo], [tests[i] for i in todo], limits,
                         entry_points=[entries[i] for i in todo], backend=chosen.name)  # fmt: skip
    scores: list[float | None] = [None] * n
    reasons = ["no tests"] * n
    for i, outcome in zip(todo, outcomes):
        scores[i], reasons[i] = outcome.score, outcome.reason
    if callable(columns.get("log_extra")):
        columns["log_extra"]("code_exec_reason", reasons)
    if callable(columns.get("log_metric")):
        columns["log_metric"]("code_exec/bwrap", 1.0 if chosen.name == "bwrap" else 0.0)
    return scores


def python_tool(limits: Limits | None = None, backend: str = "auto") -> Callable[[str], str]:
    """`run_python` with other limits or another backend (same name, signature and docstring for the tool schema)."""
    limits = limits or Limits(max_parallel=1)

    def run_python(code: str) -> str:
        return _run_tool(code, limits, backend)

    run_python.__doc__ = _run_python_doc
    return run_python


def run_python(code: str) -> str:
    """Run a Python program in a sandbox and return what it printed.

    The program runs with the standard library only, no network, no input and a few seconds of time; files it
    writes are thrown away afterwards.

    Args:
        code: The complete Python program to run; use print() to show results.

    Returns:
        The program's standard output (cut to 4000 characters), or the error it ended with.
    """
    return _run_tool(code, Limits(max_parallel=1), "auto")


_run_python_doc = run_python.__doc__


def _run_tool(code: str, limits: Limits, backend: str) -> str:
    if not code.strip():
        return "Error: no code given"
    outcome = run_sandboxed(code, "", limits, backend=backend, module="__main__")
    text = outcome.stdout
    if len(text) > _TOOL_OUTPUT_CHARS:
        text = text[:_TOOL_OUTPUT_CHARS] + f"\n[output cut at {_TOOL_OUTPUT_CHARS} characters]"
    if not outcome.passed:  # the error after the (cut) output, so that it is never cut away
        tail = outcome.stderr.strip()[-_TOOL_OUTPUT_CHARS // 2 :]
        text = f"{text.rstrip()}\nError: {outcome.reason}" + (f"\n{tail}" if tail else "")
    return text.strip("\n") if text.strip() else "(no output)"


__all__ = ["Backend", "Limits", "Outcome", "SandboxError", "code_exec_reward", "extract_code", "python_tool",
           "run_batch", "run_python", "run_sandboxed", "sandbox_backend"]  # fmt: skip
