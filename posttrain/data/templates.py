"""Prompt shaping: a format template over row columns, and TRL's conversational form for chat models."""

from __future__ import annotations

from typing import Any

from posttrain.errors import DataError


def format_prompts(ds: Any, *, template: str | None = None, system_prompt: str | None = None, chat: bool = False):
    """Apply `template` (a Python format string over the row's columns) and, with `chat`, turn the prompt into
    a list of messages that TRL and `render_prompt` pass through the tokenizer's chat template."""
    if template is None and not chat:
        return ds
    if template is not None:
        try:
            template.format(**ds[0])
        except KeyError as err:
            raise DataError(
                f"prompt_template {template!r} uses column {err} which the data doesn't have "
                f"(columns: {', '.join(ds.column_names)})"
            ) from err

    def shape(row: dict[str, Any]) -> dict[str, Any]:
        text = template.format(**row) if template is not None else row["prompt"]
        if not chat:
            return {"prompt": text}
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"prompt": [*messages, {"role": "user", "content": text}]}

    return ds.map(shape, desc="formatting prompts")


def render_prompt(prompt: str | list[dict[str, str]], tokenizer: Any) -> str:
    """The text a model sees: strings unchanged, message lists through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the prompts are chat messages but the tokenizer has no chat template; set data.chat_template: false"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
