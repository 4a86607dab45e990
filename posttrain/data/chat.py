"""Conversational data: `messages` rows (SFT), chat prompts (grpo/nft/rft), and preference transcripts split into
prompt/chosen/rejected, each checked against the chat template before any model loads.

TRL trains on conversations itself (SFTTrainer renders `messages` and, with `assistant_only_loss`, masks the loss
to the assistant turns through the template's `{% generation %}` markers, swapping in one of its bundled training
templates for the model families it knows). What it lacks, and this module adds: errors that name the row and the
role (a template silently drops a role it does not know), a split of preference transcripts that refuses two sides
sharing no prefix (TRL's `extract_prompt` returns an empty prompt), and the rendered example with its trained span
marked that `--dry-run` prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

ROLES = ("system", "user", "assistant", "tool")
HH_MARKER = "\n\nAssistant:"  # the Anthropic HH transcript layout (`\n\nHuman: ...\n\nAssistant: ...`)
CHECKED_ROWS = 2000  # rows rendered through the template by the checks (every row of a small file)


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def resolve_chat_template(value: bool | str, tokenizer: Any, where: str) -> None:
    """Apply `data.chat_template` to `tokenizer`: true keeps its own (which must exist), a string names one of TRL's
    bundled templates (e.g. `qwen2_5`, `llama3`) or a .jinja file."""
    if value is True or value is False:
        return
    template = _template_text(str(value), where)
    tokenizer.chat_template = template


def _template_text(value: str, where: str) -> str:
    path = Path(value).expanduser()
    if path.suffix == ".jinja" or path.is_file():
        if not path.is_file():
            raise DataError(f"{where}: data.chat_template: file not found: {value}")
        return path.read_text()
    import trl

    bundled = Path(trl.__file__).parent / "chat_templates"
    names = sorted(p.stem for p in bundled.glob("*.jinja"))
    if value not in names:
        from posttrain.errors import unknown_key

        raise DataError(f"{where}: data.chat_template: {unknown_key(value, names, noun='TRL chat template')}")
    return (bundled / f"{value}.jinja").read_text()


def require_template(tokenizer: Any, origin: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{origin}: the rows are chat messages but the tokenizer has no chat template; name one with "
            "data.chat_template (a TRL template such as qwen2_5 or llama3, or a .jinja file)"
        )


def check_conversations(
    conversations: Iterable[Any], tokenizer: Any, origin: str, column: str, *, assistant: bool,
    row_numbers: list[int] | None = None,
) -> None:  # fmt: skip
    """Every checked conversation (row i's `column`) is a list of {role, content} messages the template renders
    whole: a role the template drops (its content missing from the rendering) or fails on is an error naming the
    row and the role. With `assistant`, each needs an assistant turn (SFT trains on those, and only those)."""
    require_template(tokenizer, origin)
    for i, messages in enumerate(islice(conversations, CHECKED_ROWS)):
        where = f"{origin}: row {row_numbers[i] if row_numbers else i + 1}, {column}"
        _check_messages(messages, where)
        if assistant and not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn to train on (roles: {', '.join(m['role'] for m in messages)})")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # jinja's raise_exception, or a template error: the template refused this row
            roles = sorted({m["role"] for m in messages})
            raise DataError(f"{where}: the chat template failed on roles {roles}: {err}") from err
        for message in messages:
            if message["content"].strip() and message["content"] not in text:
                raise DataError(
                    f"{where}: the chat template does not render role '{message['role']}' (its content is missing "
                    "from the rendered text); use roles the template knows, e.g. system, user, assistant"
                )


def check_chat_rows(rows: Dataset, tokenizer: Any, origin: str) -> bool:
    """Check whichever conversations `rows` hold against the template: `messages` (SFT), chat prompts (grpo/nft/rft),
    or prompt + chosen/rejected turns (preferences). Returns whether the rows are conversational."""
    columns = rows.column_names
    if "messages" in columns:
        check_conversations(rows["messages"], tokenizer, origin, "messages", assistant=True)
        return True
    if "prompt" not in columns or not len(rows) or not is_conversation(rows[0]["prompt"]):
        return False
    prompts = rows["prompt"][:CHECKED_ROWS]
    sides = [c for c in ("chosen", "rejected", "completion") if c in columns]
    if not sides:
        check_conversations(prompts, tokenizer, origin, "prompt", assistant=False)
    for side in sides:
        answers = rows[side][:CHECKED_ROWS]
        whole = (list(p) + (a if isinstance(a, list) else [{"role": "assistant", "content": a}])
                 for p, a in zip(prompts, answers, strict=True))  # fmt: skip
        check_conversations(whole, tokenizer, origin, f"prompt + {side}", assistant=True)
    return True


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: message {j + 1} needs a 'role' (got {message!r:.80})")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {j + 1} (role '{message['role']}') needs text 'content'")


# ------------------------------------------------------------------------------------------ preference transcripts


def split_transcripts(rows: Dataset, origin: str, row_numbers: list[int] | None = None) -> Dataset:
    """Preference rows holding two whole transcripts (chosen/rejected, as message lists or HH-style text) -> prompt
    (their shared prefix) / chosen / rejected (each side's remainder)."""

    def split(chosen: Any, rejected: Any, index: int) -> dict[str, Any]:
        where = f"{origin}: row {row_numbers[index] if row_numbers else index + 1}"
        if is_conversation(chosen) and is_conversation(rejected):
            return _split_messages(chosen, rejected, where)
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _split_text(chosen, rejected, where)
        raise DataError(f"{where}: chosen and rejected must both be message lists or both text")

    return rows.map(split, input_columns=["chosen", "rejected"], with_indices=True, desc="splitting transcripts")


def _split_messages(chosen: list[dict], rejected: list[dict], where: str) -> dict[str, Any]:
    _check_messages(chosen, f"{where}, chosen")
    _check_messages(rejected, f"{where}, rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and _same(chosen[n], rejected[n]):
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # the compared answers start at an assistant turn
        n -= 1
    if n == 0:
        raise DataError(f"{where}: chosen and rejected share no prefix (their first messages differ), so there is "
                        "no prompt to split off; give a prompt column, or transcripts of the same conversation")  # fmt: skip
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}: one side has nothing after the shared prefix ({n} messages)")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _same(a: dict, b: dict) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def _split_text(chosen: str, rejected: str, where: str) -> dict[str, Any]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    shared = chosen[:n]
    cut = shared.rfind(HH_MARKER)
    # HH layout: the prompt ends at the last shared "Assistant:" turn; plain text: at the last shared whitespace.
    cut = cut + len(HH_MARKER) if cut != -1 else max(shared.rfind(" "), shared.rfind("\n")) + 1
    if cut <= 0 or not shared.strip():
        raise DataError(f"{where}: chosen and rejected share no prefix, so there is no prompt to split off; give a "
                        "prompt column, or transcripts of the same conversation")  # fmt: skip
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


# ---------------------------------------------------------------------------------------------- the dry-run view


def marked_example(messages: list[dict], tokenizer: Any, mark: tuple[str, str] = ("[[", "]]")) -> str:
    """One conversation rendered as SFT trains on it, with the tokens the loss covers wrapped in `mark`. Uses the
    template TRL would train with (its training variant when the model's own lacks generation markers)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=template)  # fmt: skip
    ids, mask = out["input_ids"], out["assistant_masks"]
    pieces, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            text = tokenizer.decode(ids[start:k])
            pieces.append(f"{mark[0]}{text}{mark[1]}" if mask[start] else text)
            start = k
    return "".join(pieces)
