"""The tiny local model factory: a normal HF model dir whose tokenizer ids survive save/reload."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.errors import ModelError
from posttrain.models import tiny
from posttrain.models.tiny import TinySpec, build_tiny_model, build_tokenizer, save_tiny_model


def _save_keeping_what_was_built(out, spec: TinySpec, monkeypatch):
    """Run `save_tiny_model` and return (its dir, the in-memory model and tokenizer it built and saved)."""
    built = []

    def keep(spec):
        built.append(build_tiny_model(spec))
        return built[-1]

    monkeypatch.setattr(tiny, "build_tiny_model", keep)
    out = save_tiny_model(out, spec)
    assert len(built) == 1
    return out, *built[0]


def test_a_saved_tiny_model_reloads_to_the_logits_of_the_model_before_saving(tmp_path, monkeypatch):
    out, model, tok = _save_keeping_what_was_built(
        tmp_path / "m", TinySpec(hidden_size=32, intermediate_size=64, seed=3), monkeypatch
    )
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    # every weight came from the file: one initialised afresh (a norm's ones, say) could match by chance
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    # every id as input and (embeddings tied to the head) in the output: each weight reaches these logits
    ids = torch.arange(len(tok)).unsqueeze(0)
    with torch.no_grad():
        before, after = model(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    saved = reloaded.state_dict()
    assert saved.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    assert reloaded.config.hidden_size == 32 and reloaded.config.vocab_size == len(tok)


def test_tokenizer_ids_survive_save_and_reload(tmp_path, monkeypatch):
    # transformers 5 rebuilds some families' tokenizer pipelines on reload (e.g. qwen2); ours must load as saved.
    out, _, tok = _save_keeping_what_was_built(
        tmp_path / "m", TinySpec(task="text", hidden_size=32, intermediate_size=64), monkeypatch
    )
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "Hello, world! 47+85=132\n(x)"
    before = tok(text).input_ids
    after = reloaded(text).input_ids
    assert before == after
    assert len(before) == len(text)  # one id per character
    assert reloaded.decode(after) == text
    assert reloaded.get_vocab() == tok.get_vocab()
    for special in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(reloaded, special) == getattr(tok, special), special


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
