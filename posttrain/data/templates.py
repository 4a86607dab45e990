"""Prompt shaping: a format template over row columns, and TRL's conversational form for chat models."""

from __future__ import annotations

import re
from string import Formatter
from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

Messages = list[dict[str, str]]


def format_prompts(
    ds: Dataset, *, template: str | None = None, system_prompt: str | None = None, chat: bool = False
) -> Dataset:
    """Shape the `prompt` column: fill `template` (a Python format string over the row's columns), then with
    `chat` turn it into TRL's conversational form, a list of messages (system first when `system_prompt` is set).

    Without `chat`, a `system_prompt` is put before the text with a blank line, as lm-evaluation-harness does for
    models without a chat template. Prompts that are already message lists stay messages either way.
    """
    if template is None and not chat and not system_prompt:
        return ds
    needed = _template_columns(template, ds.column_names) if template is not None else ["prompt"]
    if "prompt" in needed and "prompt" not in ds.column_names:
        raise DataError(f"no column 'prompt' to format (columns: {', '.join(ds.column_names)})")

    def shape(*values: Any) -> dict[str, Any]:
        row = dict(zip(needed, values, strict=True))
        text = _fill(template, row) if template is not None else row["prompt"]
        if isinstance(text, list):
            return {"prompt": _with_system(text, system_prompt)}
        if chat:
            return {"prompt": _with_system([{"role": "user", "content": text}], system_prompt)}
        return {"prompt": f"{system_prompt}\n\n{text}" if system_prompt else text}

    if not needed:  # a template without fields still maps over rows, which needs one input column
        needed = ds.column_names[:1]
    return ds.map(shape, input_columns=needed, desc="formatting prompts")


def render_prompt(prompt: str | Messages, tokenizer: Any) -> str:
    """The text a model sees: strings unchanged, message lists through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise DataError(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the prompts are chat messages but the tokenizer has no chat template; "
            "set data.chat_template: false to use plain-text prompts"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _template_columns(template: str, columns: list[str]) -> list[str]:
    """The columns `template` reads, checked against the data before any row is formatted."""
    braces = "write literal braces doubled, e.g. \\boxed{{}}"
    try:
        fields = [field for _, field, _, _ in Formatter().parse(template) if field is not None]
    except ValueError as err:  # a lone "{" or "}"
        raise DataError(f"prompt template {template!r} is not a valid format string ({err}); {braces}") from err
    needed: list[str] = []
    for field in fields:
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if name == "" or name.isdigit():
            raise DataError(
                f"prompt template {template!r} has a positional field '{{{field}}}'; "
                f"name a column (e.g. {{prompt}}) and {braces}"
            )
        if name not in columns:
            raise DataError(
                f"prompt template {template!r} uses column '{name}' which the data doesn't have "
                f"(columns: {', '.join(columns)})"
            )
        if name not in needed:
            needed.append(name)
    return needed


def _fill(template: str, row: dict[str, Any]) -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as err:  # e.g. a bad format spec
        raise DataError(f"prompt template {template!r} failed on a row: {type(err).__name__}: {err}") from err


def _with_system(messages: Messages, system_prompt: str | None) -> Messages:
    if not system_prompt or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


OVERLONG_PROMPTS = ("error", "filter", "left")


def limit_prompt_length(ds: Dataset, tokenizer: Any, max_tokens: int, mode: str, origin: str) -> Dataset:
    """verl's prompt-length rule (`data.max_prompt_length` with `filter_overlong_prompts` / `truncation`): prompts
    whose tokens, as the model sees them (chat template and generation prompt included), exceed `max_tokens` are
    an error naming the row (`error`), dropped (`filter`, verl's filter_overlong_prompts), or cut to their last
    `max_tokens` tokens (`left`, verl's truncation='left'; a cut conversation becomes its rendered text, as verl
    cuts the rendered ids). A summary line is printed when anything was dropped or cut."""
    if mode not in OVERLONG_PROMPTS:
        raise DataError(f"{origin}: overlong_prompts must be one of {', '.join(OVERLONG_PROMPTS)}, got {mode!r}")
    if "prompt" not in ds.column_names:
        raise DataError(f"{origin}: max_prompt_length needs a 'prompt' column (columns: {', '.join(ds.column_names)})")
    texts = [render_prompt(p, tokenizer) for p in ds["prompt"]]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    over = [i for i, row in enumerate(ids) if len(row) > max_tokens]
    if not over:
        return ds
    longest = max(len(ids[i]) for i in over)
    if mode == "error":
        raise DataError(
            f"{origin}: row {over[0]} has a prompt of {len(ids[over[0]])} tokens, over data.max_prompt_length "
            f"{max_tokens} ({len(over)} of {len(ds)} rows are; data.overlong_prompts: filter drops them, left cuts)"
        )
    if mode == "filter":
        if len(over) == len(ds):
            raise DataError(f"{origin}: every prompt is over data.max_prompt_length {max_tokens} tokens")
        print(f"{origin}: dropped {len(over)} of {len(ds)} prompts over {max_tokens} tokens (longest {longest})")
        keep = sorted(set(range(len(ds))) - set(over))
        return ds.select(keep)
    print(f"{origin}: cut {len(over)} of {len(ds)} prompts to their last {max_tokens} tokens (longest {longest})")
    cut = {i: tokenizer.decode(ids[i][-max_tokens:]) for i in over}
    # One column type: a cut conversation is rendered text, so every prompt becomes the text the model sees.
    return ds.map(lambda _, i: {"prompt": cut.get(i, texts[i])}, with_indices=True, input_columns="prompt",
                  remove_columns="prompt", desc="cutting prompts")  # fmt: skip
