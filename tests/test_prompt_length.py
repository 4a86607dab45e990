"""`data.max_prompt_length` / `data.overlong_prompts`: verl's prompt-length rule (filter_overlong_prompts, truncation
'left'), counted on the tokens the model sees, template included, with the errors a recipe gets for misusing it."""

import json

import pytest
from datasets import Dataset

from posttrain.data.templates import limit_prompt_length, render_prompt
from posttrain.errors import DataError, PosttrainError
from posttrain.models.tiny import build_tokenizer
from posttrain.registry import load_and_validate
from posttrain.runs import RunDir
from posttrain.trainers import base

TEXT = build_tokenizer("text")
CHAT = build_tokenizer("text", chat=True)


def n_tokens(tokenizer, prompt) -> int:
    return len(tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"])


def test_the_count_is_the_rendered_prompt_and_the_limit_is_inclusive():
    chat = [{"role": "user", "content": "abcd"}]
    # ChatML around 4 characters: "<|im_start|>" "user\n" ... "<|im_end|>" "\n" "<|im_start|>" "assistant\n"
    size = n_tokens(CHAT, chat)
    assert size == 1 + 5 + 4 + 1 + 1 + 1 + 10
    rows = Dataset.from_dict({"prompt": [chat, [{"role": "user", "content": "abcde"}]]})
    kept = limit_prompt_length(rows, CHAT, size, "filter", "data.train")
    assert kept["prompt"] == [chat]  # exactly at the limit stays; one token over goes


def test_filter_drops_exactly_the_overlong_rows_and_keeps_the_other_columns(capsys):
    prompts = ["a" * 3, "b" * 9, "c" * 5, "d" * 6, "e" * 12]
    rows = Dataset.from_dict({"prompt": prompts, "answer": ["1", "2", "3", "4", "5"]})
    kept = limit_prompt_length(rows, TEXT, 5, "filter", "r.yaml: data.train")
    assert kept["prompt"] == ["aaa", "ccccc"] and kept["answer"] == ["1", "3"]
    assert "dropped 3 of 5 prompts over 5 tokens (longest 12)" in capsys.readouterr().out


def test_error_names_the_first_overlong_row_and_the_ways_out():
    rows = Dataset.from_dict({"prompt": ["ok", "too long here", "fine"]})
    with pytest.raises(DataError, match=r"r.yaml: data.train: row 1 has a prompt of 13 tokens, over "
                                        r"data.max_prompt_length 4 \(1 of 3 rows.*filter drops them"):  # fmt: skip
        limit_prompt_length(rows, TEXT, 4, "error", "r.yaml: data.train")


def test_filter_refuses_to_drop_every_row():
    rows = Dataset.from_dict({"prompt": ["long one", "another"]})
    with pytest.raises(DataError, match="every prompt is over data.max_prompt_length 2"):
        limit_prompt_length(rows, TEXT, 2, "filter", "data.train")


def test_left_keeps_the_last_tokens_as_verl_truncation_left():
    rows = Dataset.from_dict({"prompt": ["0123456789", "abc"]})
    cut = limit_prompt_length(rows, TEXT, 4, "left", "data.train")
    assert cut["prompt"] == ["6789", "abc"]


def test_left_on_conversations_cuts_the_rendered_ids_and_keeps_short_ones_as_the_model_sees_them():
    long_chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is one plus one"}]
    short_chat = [{"role": "user", "content": "hi"}]
    limit = n_tokens(CHAT, short_chat) + 3
    cut = limit_prompt_length(Dataset.from_dict({"prompt": [long_chat, short_chat]}), CHAT, limit, "left", "d")
    full = render_prompt(long_chat, CHAT)
    ids = CHAT(full, add_special_tokens=False)["input_ids"]
    assert cut["prompt"][0] == CHAT.decode(ids[-limit:]) and full.endswith(cut["prompt"][0][-12:])
    assert n_tokens(CHAT, cut["prompt"][0]) == limit
    assert cut["prompt"][1] == render_prompt(short_chat, CHAT)  # same text the template gave; one column type


def test_nothing_over_the_limit_leaves_the_rows_untouched():
    rows = Dataset.from_dict({"prompt": ["ab", "cd"]})
    assert limit_prompt_length(rows, TEXT, 2, "error", "d") is rows


def test_rows_without_prompts_and_unknown_modes_are_named():
    with pytest.raises(DataError, match="needs a 'prompt' column"):
        limit_prompt_length(Dataset.from_dict({"messages": [[]]}), TEXT, 2, "filter", "d")
    with pytest.raises(DataError, match="overlong_prompts must be one of error, filter, left, got 'right'"):
        limit_prompt_length(Dataset.from_dict({"prompt": ["a"]}), TEXT, 2, "right", "d")


def write(tmp_path, body: dict, rows: list[dict]):
    import yaml

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    body.setdefault("data", {})["train"] = {"path": str(data)}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "plen", "output_dir": str(tmp_path / "run"), **body}))
    return path


def test_a_grpo_recipe_trains_on_the_filtered_prompts(tmp_path, monkeypatch):
    rows = [{"prompt": p, "answer": "1"} for p in ["1+0=", "12+34+56+78=", "2+3=", "99+99+99="]]
    body = {"trainer": "grpo", "model": {"tiny": {"hidden_size": 32, "intermediate_size": 64}},
            "data": {"max_prompt_length": 6, "overlong_prompts": "filter"}, "rewards": [{"name": "numeric_match"}]}  # fmt: skip
    recipe = load_and_validate(write(tmp_path, body, rows))
    monkeypatch.setattr(base, "load_policy", lambda *args: "policy")  # the rows are the point, not the weights
    policy, _, kept = base.load_policy_tokenizer_data(recipe, RunDir(tmp_path / "run"), schema="prompt")
    assert kept["prompt"] == ["1+0=", "2+3="] and policy == "policy"
    plan = "\n".join(base.describe_text_data(recipe))  # what --dry-run says
    assert "prompts: at most 6 tokens with the chat template (data.max_prompt_length); longer ones are dropped" in plan


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"trainer": "grpo", "data": {"overlong_prompts": "filter"}}, "overlong_prompts: filter needs data.max_prompt_length"),
        ({"trainer": "reward", "data": {"max_prompt_length": 8}}, "max_prompt_length applies to the prompts of a causal LM"),
        ({"trainer": "grpo", "data": {"max_prompt_length": 0}}, "max_prompt_length"),
        ({"trainer": "grpo", "data": {"max_prompt_length": 8, "overlong_prompts": "right"}}, "overlong_prompts"),
    ],
)  # fmt: skip
def test_recipe_misuse_is_named_before_any_model_loads(tmp_path, no_models, body, message):
    body = {"model": {"tiny": {}}, "rewards": [{"name": "numeric_match"}], **body}
    rows = [{"prompt": "1+1=", "answer": "2", "chosen": "2", "rejected": "3"}]
    with pytest.raises(PosttrainError, match=message):
        load_and_validate(write(tmp_path, body, rows))
