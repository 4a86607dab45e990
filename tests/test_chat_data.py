"""Conversational data: `messages` SFT with the loss on assistant turns only (checked token by token against the
template), chat prompts for GRPO, preference transcripts split for DPO/reward, and the errors bad chat data gets
before any model loads."""

import json

import pytest

from posttrain.data.chat import check_conversations, marked_example, split_transcripts
from posttrain.errors import DataError, PosttrainError
from posttrain.models.tiny import CHAT_TOKENS, build_tokenizer
from posttrain.registry import load_and_validate
from posttrain.runs import RunDir
from posttrain.train import train_recipe

TINY_CHAT = {"task": "text", "chat": True, "hidden_size": 64, "intermediate_size": 128}
WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reverse_chat(word, system=True):
    head = [{"role": "system", "content": "Reverse the word."}] if system else []
    return [*head, {"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]


def write_recipe(tmp_path, body: dict, name="chat"):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(tmp_path / name), **body}))
    return path


def sft_body(data_path, **training):
    return {
        "trainer": "sft",
        "model": {"tiny": TINY_CHAT},
        "data": {"train": {"path": data_path}},
        "training": {"max_steps": 80, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 10,
                     "save_steps": 1000, **training},
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- the loss mask


def expected_mask(tokenizer, messages) -> list[int]:
    """Independently of TRL: 1 on the tokens of each assistant turn's content and its <|im_end|>, from the rendered
    text's character offsets (the tiny chat tokenizer is one token per character, plus ChatML's two tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, at = [], 0
    for m in messages:
        at = text.index(m["content"] + CHAT_TOKENS[1], at)
        if m["role"] == "assistant":
            spans.append((at, at + len(m["content"]) + len(CHAT_TOKENS[1])))
        at += len(m["content"])
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [int(any(a <= s and e <= b for a, b in spans)) for s, e in enc["offset_mapping"]], enc["input_ids"]


def test_messages_sft_masks_every_token_but_the_assistant_turns(tmp_path):
    from posttrain.trainers.sft import build_trainer

    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
             {"role": "assistant", "content": "bye"}]  # fmt: skip
    rows = [{"messages": convo}, {"messages": reverse_chat("cat", system=False)}]
    recipe = load_and_validate(write_recipe(tmp_path, sft_body(write_jsonl(tmp_path / "c.jsonl", rows))))
    trainer, tokenizer = build_trainer(recipe, RunDir(tmp_path / "chat"))
    for i, row in enumerate(rows):
        mask, ids = expected_mask(tokenizer, row["messages"])
        processed = trainer.train_dataset[i]
        assert processed["input_ids"] == ids
        assert processed["labels"] == [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        assert sum(mask) == sum(len(m["content"]) + 1 for m in row["messages"] if m["role"] == "assistant")
    # What a step trains on: the collated batch keeps those labels (the rest is -100, no loss).
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert [t != -100 for t in batch["labels"][0].tolist()] == [bool(b) for b in expected_mask(tokenizer, convo)[0]]


@pytest.mark.slow  # a learning run (6-12 s on 2 cores): the default run stays under 3 minutes
def test_messages_sft_learns_the_assistant_replies(tmp_path):
    rows = [{"messages": reverse_chat(w)} for w in WORDS]
    body = sft_body(write_jsonl(tmp_path / "c.jsonl", rows * 8), max_steps=120)
    body["model"]["tiny"] = {"task": "text", "chat": True}  # TinySpec's default width (64 mixed up dog/box)
    train_recipe(load_and_validate(write_recipe(tmp_path, body)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "chat" / "final"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    right = 0
    for word in WORDS:
        prompt = tokenizer.apply_chat_template(reverse_chat(word)[:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        right += tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == word[::-1]
    assert right >= 7, right  # a fresh model gets none; the eos after the reply is trained too (it stops)


def test_dry_run_prints_one_conversation_with_its_trained_span(tmp_path):
    from posttrain.train import dry_run_plan

    rows = [{"messages": reverse_chat("cat")}]
    plan = "\n".join(
        dry_run_plan(load_and_validate(write_recipe(tmp_path, sft_body(write_jsonl(tmp_path / "c.jsonl", rows)))))
    )
    assert "[[tac<|im_end|>]]" in plan and "<|im_start|>user" in plan
    assert "[[cat" not in plan  # the user's turn is not trained on


# ------------------------------------------------------------------------------------------ chat prompts, GRPO


@pytest.mark.slow  # a learning run (6-12 s on 2 cores): the default run stays under 3 minutes
def test_grpo_on_chat_prompts_renders_them_and_raises_reward(tmp_path, user_rewards):
    from posttrain.models.tiny import TinySpec, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", TinySpec(**TINY_CHAT))
    rows = [{"prompt": [{"role": "user", "content": f"say a digit {i}"}]} for i in range(64)]
    body = {
        "trainer": "grpo",
        "model": {"path": str(model_dir)},
        "data": {"train": {"path": write_jsonl(tmp_path / "p.jsonl", rows)}},
        "rewards": [{"name": "my_rewards:starts_with_seven"}],
        "rollout": {"num_generations": 8, "max_new_tokens": 3},
        "algorithm": {"loss_type": "dapo", "beta": 0.0},
        "training": {"max_steps": 60, "per_device_train_batch_size": 64, "learning_rate": 3e-3, "logging_steps": 1,
                     "save_steps": 1000},
    }  # fmt: skip
    train_recipe(load_and_validate(write_recipe(tmp_path, body, "grpo")))
    records = RunDir(tmp_path / "grpo").read_metrics()
    rewards = [r["reward"] for r in records if "reward" in r]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards


# ------------------------------------------------------------------------------------------ preference transcripts


def test_transcripts_split_at_the_shared_prefix_messages_and_hh_text():
    from datasets import Dataset

    user = {"role": "user", "content": "2+2?"}
    conv = split_transcripts(Dataset.from_list([{"chosen": [user, {"role": "assistant", "content": "4"}],
                                                 "rejected": [user, {"role": "assistant", "content": "5"}]}]), "x")  # fmt: skip
    assert conv[0] == {"chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}], "prompt": [user]}  # fmt: skip
    hh = split_transcripts(Dataset.from_list([{"chosen": "\n\nHuman: hi\n\nAssistant: hello there",
                                               "rejected": "\n\nHuman: hi\n\nAssistant: help"}]), "x")  # fmt: skip
    # Cut at the last shared "Assistant:" turn, not inside the shared "hel".
    assert (hh[0]["prompt"], hh[0]["chosen"], hh[0]["rejected"]) == (
        "\n\nHuman: hi\n\nAssistant:",
        " hello there",
        " help",
    )


def test_transcript_preferences_train_dpo(tmp_path):
    from posttrain.models.tiny import TinySpec, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", TinySpec(**TINY_CHAT))
    rows = []
    for w in WORDS * 4:
        ask = [{"role": "user", "content": w}]
        rows.append({"chosen": [*ask, {"role": "assistant", "content": w[::-1]}],
                     "rejected": [*ask, {"role": "assistant", "content": w}]})  # fmt: skip
    body = {
        "trainer": "dpo",
        "model": {"path": str(model_dir)},
        "data": {"train": {"path": write_jsonl(tmp_path / "t.jsonl", rows)}},
        "algorithm": {"beta": 0.1},
        "training": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 1,
                     "save_steps": 1000},
    }  # fmt: skip
    train_recipe(load_and_validate(write_recipe(tmp_path, body, "dpo")))
    records = [r for r in RunDir(tmp_path / "dpo").read_metrics() if "rewards/margins" in r]
    assert records and records[-1]["rewards/margins"] > records[0]["rewards/margins"], records


# ------------------------------------------------------------------------------------- errors before any model loads


def dry_run_error(tmp_path, body) -> str:
    with pytest.raises(PosttrainError) as err:
        load_and_validate(write_recipe(tmp_path, body))
    return str(err.value)


def test_messages_for_a_tokenizer_without_a_chat_template_fail_at_validation(tmp_path):
    body = sft_body(write_jsonl(tmp_path / "c.jsonl", [{"messages": reverse_chat("cat")}]))
    body["model"]["tiny"] = {**TINY_CHAT, "chat": False}
    msg = dry_run_error(tmp_path, body)
    assert "no chat template" in msg and "data.chat_template" in msg and "c.jsonl" not in msg.split("no chat")[1]


def test_a_role_the_template_does_not_know_is_named_with_its_row(tmp_path):
    rows = [{"messages": reverse_chat("cat")}, {"messages": [{"role": "narrator", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]}]  # fmt: skip
    msg = dry_run_error(tmp_path, sft_body(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert "row 2" in msg and "narrator" in msg


def test_a_role_a_template_silently_drops_is_caught():
    tokenizer = build_tokenizer("text", chat=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'critic' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    convo = [
        {"role": "user", "content": "a"},
        {"role": "critic", "content": "bad"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(DataError, match="does not render role 'critic'"):
        check_conversations([convo], tokenizer, "x.yaml: data.train", "messages", assistant=True)


def test_transcripts_sharing_no_prefix_are_refused_with_their_row(tmp_path):
    rows = [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "b"}]}]  # fmt: skip
    body = {
        "trainer": "dpo",
        "model": {"tiny": TINY_CHAT},
        "data": {"train": {"path": write_jsonl(tmp_path / "t.jsonl", rows)}},
    }
    msg = dry_run_error(tmp_path, body)
    assert "row 1" in msg and "share no prefix" in msg


def test_an_unknown_named_template_is_refused_with_suggestions(tmp_path):
    body = sft_body(write_jsonl(tmp_path / "c.jsonl", [{"messages": reverse_chat("cat")}]))
    body["data"]["chat_template"] = "qwen25"
    msg = dry_run_error(tmp_path, body)
    assert "qwen2_5" in msg


def test_a_named_trl_template_is_applied_and_marks_the_trained_span():
    tokenizer = build_tokenizer("text", chat=True)
    from posttrain.data.chat import resolve_chat_template

    resolve_chat_template("qwen2_5", tokenizer, "x.yaml")
    text = marked_example(reverse_chat("cat"), tokenizer)
    assert text.startswith("<|im_start|>system") and "[[" in text and "tac" in text.split("[[", 1)[1]
