"""The tiny local model factory: a normal HF model dir whose tokenizer ids survive save/reload."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.errors import ModelError
from posttrain.models.tiny import TinySpec, build_tokenizer, save_tiny_model


def test_tiny_model_round_trips_through_from_pretrained(tmp_path):
    out = save_tiny_model(tmp_path / "m", TinySpec(hidden_size=32, intermediate_size=64, seed=3))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("47+85=", return_tensors="pt").input_ids
    fresh = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok)


def test_tokenizer_ids_survive_save_and_reload(tmp_path):
    # transformers 5 rebuilds some families' tokenizer pipelines on reload (e.g. qwen2); ours must load as saved.
    tok = build_tokenizer("text")
    text = "Hello, world! 47+85=132\n(x)"
    before = tok(text).input_ids
    save_tiny_model(tmp_path / "m", TinySpec(task="text", hidden_size=32, intermediate_size=64))
    after = AutoTokenizer.from_pretrained(tmp_path / "m")(text).input_ids
    assert before == after
    assert len(before) == len(text)  # one id per character
    assert AutoTokenizer.from_pretrained(tmp_path / "m").decode(after) == text


def test_arithmetic_tokenizer_has_special_tokens():
    tok = build_tokenizer("arithmetic")
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert tok.decode(tok("12+34=46").input_ids) == "12+34=46"


def test_unknown_task_is_an_error():
    with pytest.raises(ModelError, match="unknown tiny-model task 'chess'"):
        build_tokenizer("chess")


def test_cli_tiny_model(tmp_path, capsys):
    assert main(["tiny-model", "--task", "arithmetic", "--out", str(tmp_path / "t"), "--hidden-size", "32"]) == 0
    assert (tmp_path / "t" / "config.json").exists() and (tmp_path / "t" / "tokenizer.json").exists()
