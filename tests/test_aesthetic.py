"""The LAION aesthetic predictor scorer (`aesthetic`, reward_models/image.py) on a tiny random CLIP and a tiny MLP
with the published checkpoint's key names: the score is the hand-computed forward pass, and bad weights fail clearly.
"""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.toy_images import draw_square
from reward_models.image import ImageScorerError, image_scorer

PROJECTION = 16  # the tiny CLIP's projection_dim: the MLP's input width (768 for ViT-L/14)
WIDTHS = (PROJECTION, 12, 10, 8, 6, 1)  # the published MLP: 768, 1024, 128, 64, 16, 1
LINEARS = (0, 2, 4, 6, 7)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP (random weights, locally built tokenizer and image processor) saved as one model dir."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from posttrain.models.tiny_diffusion import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(max_length=77)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": PROJECTION,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "projection_dim": PROJECTION},
        projection_dim=PROJECTION,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("aesthetic_clip")
    CLIPModel(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def mlp_state(widths=WIDTHS, linears=LINEARS, seed=1) -> dict[str, torch.Tensor]:
    """A random state_dict with the published .pth's key names (`layers.<i>.weight/bias`), here of tiny widths."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (n_in, n_out) in zip(linears, zip(widths, widths[1:])):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=g)
    return state


def published_layout(widths=WIDTHS, seed=1) -> dict[str, torch.Tensor]:
    """`model.state_dict()` of a module laid out as the predictor's train_predictor.py MLP (`self.layers`: Linear,
    Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear), at tiny widths; its keys are
    what `torch.save(model.state_dict(), ...)` wrote into the published .pth."""
    torch.manual_seed(seed)
    n = widths
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(
        torch.nn.Linear(n[0], n[1]), torch.nn.Dropout(0.2), torch.nn.Linear(n[1], n[2]), torch.nn.Dropout(0.2),
        torch.nn.Linear(n[2], n[3]), torch.nn.Dropout(0.1), torch.nn.Linear(n[3], n[4]), torch.nn.Linear(n[4], n[5]),
    )  # fmt: skip
    return model.state_dict()


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(published_layout(), path)
    return path


def images() -> torch.Tensor:
    rng = random.Random(0)
    return torch.stack([draw_square(c, s, 16, rng) for c, s in (("red", True), ("green", False), ("blue", True))])


def by_hand(clip_dir, state, pictures) -> list[float]:
    """The reference: CLIP's vision tower + projection, L2-normalised, then the five Linears as plain matmuls."""
    from transformers import CLIPModel, CLIPProcessor

    from reward_models.image import to_pil

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    pixels = processor(images=to_pil(pictures), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        x = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    x = x / x.norm(dim=-1, keepdim=True)
    for i in LINEARS:
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1).tolist()


def test_aesthetic_score_is_the_mlp_over_the_normalised_clip_image_embedding(tiny_clip, mlp_file, monkeypatch):
    import reward_models.image as image

    scorer = image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=str(mlp_file), device="cpu")
    pictures = images()
    expected = by_hand(tiny_clip, published_layout(), pictures)
    scores = scorer.score(pictures, ["a red square", "a green square", "a blue square"])
    assert scores == pytest.approx(expected, abs=1e-5) and len({round(s, 5) for s in scores}) == 3
    assert scorer.score(pictures, ["", "x", "y"]) == pytest.approx(scores, abs=1e-6)  # the prompt is not used
    monkeypatch.setattr(image, "BATCH", 2)  # 3 images in two forward passes: the same scores
    assert scorer.score(pictures, ["a", "b", "c"]) == pytest.approx(expected, abs=1e-5)
    assert not scorer.mlp.training and [type(m).__name__ for m in scorer.mlp] == [
        "Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout", "Linear", "Linear"]  # fmt: skip


def test_aesthetic_needs_the_mlp_weights_and_names_where_to_get_them(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default mlp_path is relative to the working directory
    with pytest.raises(ImageScorerError, match="MLP weights not found at models/sac\\+logos\\+ava1-l14-linearMSE.pth "
                       "\\(download .* from github.com/christophschuhmann/improved-aesthetic-predictor"):  # fmt: skip
        image_scorer("aesthetic", model_path=str(tiny_clip))
    with pytest.raises(ImageScorerError, match="'aesthetic' needs mlp_path.*improved-aesthetic-predictor"):
        image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=None)
    missing = tmp_path / "nope.pth"
    with pytest.raises(ImageScorerError, match=f"MLP weights not found at {missing} \\(download sac\\+logos"):
        image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=str(missing))
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(ImageScorerError, match="could not read .*garbage.pth as a state_dict"):
        image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=str(tmp_path / "garbage.pth"))


def test_aesthetic_names_wrong_keys_and_shapes(tiny_clip, tmp_path):
    relu = tmp_path / "relu.pth"  # a layout with activations between the Linears: other indices
    torch.save(mlp_state(linears=(0, 3, 6, 9, 11)), relu)
    with pytest.raises(ImageScorerError, match=r"not the aesthetic predictor's MLP: missing keys \[layers.2.weight, "
                       r"layers.2.bias, layers.4.weight.*unexpected keys \[layers.3.weight"):  # fmt: skip
        image_scorer("aesthetic", model_path=str(tmp_path / "no_clip_needed"), mlp_path=str(relu))  # fails first
    wide = tmp_path / "wide.pth"  # a 768-wide input for a CLIP whose projection_dim is 16
    torch.save(mlp_state(widths=(768, 12, 10, 8, 6, 1)), wide)
    with pytest.raises(ImageScorerError, match=r"layers.0 has weight \(12, 768\).*expected weight \(out, 16\).*"
                       r"the CLIP's projection_dim, 16"):  # fmt: skip
        image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=str(wide))
    broken = tmp_path / "broken.pth"  # the chain breaks inside the MLP
    state = mlp_state()
    state["layers.4.weight"] = torch.zeros(8, 9)
    torch.save(state, broken)
    with pytest.raises(ImageScorerError, match=r"layers.4 has weight \(8, 9\), bias \(8,\); expected weight \(out, 10"):
        image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=str(broken))
    two = tmp_path / "two.pth"
    torch.save(mlp_state(widths=(PROJECTION, 12, 10, 8, 6, 2)), two)
    with pytest.raises(ImageScorerError, match="layers.7 has 2 outputs; expected 1"):
        image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=str(two))
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ImageScorerError, match="holds a list, not a state_dict"):
        image_scorer("aesthetic", model_path=str(tiny_clip), mlp_path=str(listed))
