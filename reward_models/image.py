"""Image scorers for text-to-image evaluation: `score(images, prompts) -> list[float]`, one score per image.

`images` is a list of PIL images or a float tensor (B, 3, H, W) in [-1, 1] (what `posttrain.models.diffusion` samples);
each scorer converts to what it needs. Built-ins, by name (`image_scorer(name, **kwargs)`):

- `saturation`: the coloured-squares task's analytic reward (`saturation_reward` below; the task's data is
  `posttrain.data.toy_images`): ~1.0 for a saturated square of the prompt's colour, ~0.25 for a dull one, 0 for
  grey. Needs nothing.
- `pickscore`: PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic: by default the raw cosine of
  the CLIP image and text embeddings x 100, the number the SePPO and Diffusion-DPO papers report;
  `scale: logit` multiplies by the model's own exp(logit_scale) instead (the authors' inference snippet).
- `hpsv2`: Human Preference Score v2 (Wu et al. 2023) through the `hpsv2` package, v2.0 by default (the SePPO
  paper's), `hps_version: v2.1` for the later checkpoint; reported x 100 (~27 for SD 1.5 images, as the SePPO paper
  prints it), `scale: raw` for the package's own number (~0.27).
- `imagereward`: ImageReward (Xu et al. 2023) through the `image-reward` package (`import ImageReward`).
- `clip_score`: CLIPScore (Hessel et al. 2021) as torchmetrics computes it: max(100 x cos(image, text), 0).
- `aesthetic`: the LAION "improved aesthetic predictor" (sac+logos+ava1-l14-linearMSE): an MLP over the L2-normalised
  CLIP ViT-L/14 image embedding, ~1-10 (the scale the SePPO paper reports); the prompt is not used.

The real adapters import their packages and load their weights lazily, in the constructor (so an evaluation fails
before it samples any image), and raise `ImageScorerError` naming the missing package or weights path. No hub
downloads are attempted implicitly: pass a local path (or a hub id when your machine is online).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from reward_models.errors import RewardError, unknown_key

if TYPE_CHECKING:
    import torch


class ImageScorerError(RewardError):
    """An image scorer can't be built: unknown name, missing package or missing weights."""


class ImageScorer(Protocol):
    name: str

    def score(self, images: Any, prompts: Sequence[str]) -> list[float]: ...


# ------------------------------------------------------------------------------------------ conversions


def to_tensor(images: Any):
    """PIL images or a (B, 3, H, W) tensor in [-1, 1] → a float tensor (B, 3, H, W) in [-1, 1] on the CPU."""
    import torch

    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        return images.detach().float().cpu()
    import numpy as np

    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: Any) -> list:
    """A (B, 3, H, W) tensor in [-1, 1] (or PIL images, returned as they are) → a list of RGB PIL images."""
    import torch
    from PIL import Image

    if not isinstance(images, torch.Tensor):
        return [image.convert("RGB") for image in images]
    pixels = ((to_tensor(images).clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def image_grid(rows: Sequence[Any], min_cell: int = 64, pad: int = 2):
    """One PIL image of `rows` (each a (B, 3, H, W) tensor in [-1, 1] or a list of PIL images) laid out row by row
    on white, each image upscaled (nearest, so pixels stay visible) to at least `min_cell` pixels a side."""
    from PIL import Image

    rows = [to_pil(row) for row in rows]
    width, height = rows[0][0].size
    scale = max(1, -(-min_cell // max(width, height)))  # ceil
    cell_w, cell_h = width * scale, height * scale
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(
                image.resize((cell_w, cell_h), Image.NEAREST), (pad + c * (cell_w + pad), pad + r * (cell_h + pad))
            )
    return grid


def _check_lengths(images: Any, prompts: Sequence[str]) -> None:
    n = images.shape[0] if hasattr(images, "shape") else len(images)
    if n != len(prompts):
        raise ValueError(f"score: {n} images but {len(prompts)} prompts")


def _require(module: str, package: str, scorer: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImageScorerError(
            f"image scorer '{scorer}' needs the package '{package}' (pip install {package}); "
            f"importing '{module}' failed: {err}"
        ) from err


def _require_weights(path: str | Path, scorer: str, what: str, hint: str) -> str:
    """A local weights dir must exist; a hub id is passed through (from_pretrained fails clearly when offline)."""
    text = str(path)
    looks_local = text.startswith((".", "/", "~")) or Path(text).expanduser().exists() or text.count("/") != 1
    if looks_local and not Path(text).expanduser().exists():
        raise ImageScorerError(f"image scorer '{scorer}': {what} not found at {text} ({hint})")
    return str(Path(text).expanduser()) if looks_local else text


def _load(loader: Callable[[], Any], scorer: str, path: str, hint: str) -> Any:
    try:
        return loader()
    except (OSError, ValueError) as err:
        raise ImageScorerError(f"image scorer '{scorer}': could not load weights from {path} ({hint}): {err}") from err


# ----------------------------------------------------------------------------------------------- toy


COLORS = ("red", "green", "blue")  # the coloured-squares task's prompts (posttrain.data.toy_images draws them)
TOP_FRACTION = 0.05  # the reward averages the most prompt-coloured 5% of pixels (the smallest square covers 14%)


def saturation_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per image: chroma of the prompt colour (its channel minus the larger other channel, in [0, 1] units),
    averaged over the top `TOP_FRACTION` of pixels. `images` is (B, 3, H, W) in [-1, 1].

    ~1.0 for a square in the saturated prompt colour, ~0.25 for a dull one (the same hue, mostly grey), 0 for a
    blank grey image or a square of another colour."""
    import torch

    x = (images.float().clamp(-1, 1) + 1.0) / 2.0
    scores = []
    for image, prompt in zip(x, prompts):
        c = COLORS.index(prompt.strip().lower())
        others = torch.cat([image[:c], image[c + 1 :]]).amax(dim=0)
        chroma = (image[c] - others).flatten()
        k = max(1, int(TOP_FRACTION * chroma.numel()))
        scores.append(chroma.topk(k).values.mean().clamp(min=0.0))
    return torch.stack(scores)


class SaturationScorer:
    """The coloured-squares task's analytic reward; prompts must be 'red', 'green' or 'blue'."""

    name = "saturation"

    def score(self, images: Any, prompts: Sequence[str]) -> list[float]:
        _check_lengths(images, prompts)
        bad = [p for p in prompts if p.strip().lower() not in COLORS]
        if bad:
            raise ImageScorerError(f"image scorer 'saturation': prompts must be one of {COLORS}, got {bad[0]!r}")
        return [float(v) for v in saturation_reward(to_tensor(images), list(prompts))]


# ------------------------------------------------------------------------------------------ CLIP-based


BATCH = 32  # images per CLIP forward pass


class _ClipLike:
    """Shared by PickScore, CLIP score and the aesthetic score: a transformers CLIP model + processor."""

    name = ""
    hint = ""

    def __init__(self, model_path: str, processor_path: str | None = None, device: str | None = None):
        transformers = _require("transformers", "transformers", self.name)
        import torch

        model_path = _require_weights(model_path, self.name, "model weights", self.hint)
        processor_path = _require_weights(processor_path or model_path, self.name, "processor", self.hint)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = _load(lambda: transformers.AutoProcessor.from_pretrained(processor_path), self.name,
                               processor_path, self.hint)  # fmt: skip
        self.model = _load(lambda: transformers.AutoModel.from_pretrained(model_path), self.name, model_path, self.hint)
        self.model.eval().to(self.device)

    def _cosine(self, images: Any, prompts: Sequence[str]):
        """cos(image, text) per pair, `BATCH` pairs a forward pass (a benchmark scores all its images in one call)."""
        import torch

        images, out = to_pil(images), []
        for start in range(0, len(images), BATCH):
            inputs = self.processor(
                images=images[start : start + BATCH], text=list(prompts[start : start + BATCH]), padding=True,
                truncation=True, max_length=77, return_tensors="pt",
            ).to(self.device)  # fmt: skip
            with torch.no_grad():
                image_emb = _projected(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
                text_emb = _projected(self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")))  # fmt: skip
            image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
            text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
            out.append((image_emb * text_emb).sum(dim=-1))
        return torch.cat(out)


def _projected(features: Any) -> Any:
    """The projected embeddings: transformers 4 returns the tensor, transformers 5 a BaseModelOutputWithPooling whose
    `pooler_output` holds them."""
    return features if hasattr(features, "norm") else features.pooler_output


class PickScoreScorer(_ClipLike):
    """PickScore with the PickScore_v1 CLIP-H (Kirstain et al. 2023): `scale: cosine100` (default) = 100 x
    cos(image, text), as the SePPO paper reports it (~21-23 for SD 1.5 images); `scale: logit` = exp(logit_scale)
    x cos, the authors' inference snippet (the same number when the fine-tuned logit scale is exp(4.6052) = 100)."""

    name = "pickscore"
    hint = (
        "download yuvalkirstain/PickScore_v1 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (processor) and pass their paths"
    )

    def __init__(self, model_path: str = "yuvalkirstain/PickScore_v1",
                 processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str | None = None,
                 scale: str = "cosine100"):  # fmt: skip
        if scale not in ("cosine100", "logit"):
            raise ImageScorerError(f"pickscore: scale must be 'cosine100' or 'logit', got {scale!r}")
        super().__init__(model_path, processor_path, device)
        self.scale = scale

    def score(self, images: Any, prompts: Sequence[str]) -> list[float]:
        _check_lengths(images, prompts)
        factor = float(self.model.logit_scale.detach().exp()) if self.scale == "logit" else 100.0
        return [float(v) for v in (factor * self._cosine(images, prompts)).cpu()]


class ClipScorer(_ClipLike):
    """CLIPScore as torchmetrics defines it: max(100 x cos(image, text), 0) (Hessel et al. 2021 without w = 2.5)."""

    name = "clip_score"
    hint = "download openai/clip-vit-large-patch14 (or another CLIP) and pass model_path"

    def __init__(self, model_path: str = "openai/clip-vit-large-patch14", device: str | None = None):
        super().__init__(model_path, None, device)

    def score(self, images: Any, prompts: Sequence[str]) -> list[float]:
        _check_lengths(images, prompts)
        return [float(v) for v in (100.0 * self._cosine(images, prompts)).clamp(min=0.0).cpu()]


AESTHETIC_LINEARS = (0, 2, 4, 6, 7)  # the Linear layers' indices in the predictor's nn.Sequential ("layers.<i>")
AESTHETIC_DROPOUTS = (0.2, 0.2, 0.1)  # after the first three Linears (indices 1, 3, 5); no activation anywhere
AESTHETIC_MLP = "models/sac+logos+ava1-l14-linearMSE.pth"  # the default mlp_path, relative to the working directory
AESTHETIC_HINT = (
    "download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor "
    f"and put it at {AESTHETIC_MLP} or pass its path as mlp_path"
)


class AestheticScorer(_ClipLike):
    """The LAION "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor, the
    `sac+logos+ava1-l14-linearMSE.pth` MLP): the CLIP ViT-L/14 image embedding (openai/clip-vit-large-patch14's
    projected image features, what `clip.encode_image` returns), L2-normalised (a zero vector left as it is), into
    Linear(768, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2) -> Linear(128, 64) -> Dropout(0.1) ->
    Linear(64, 16) -> Linear(16, 1), no activations; the score is the MLP's output (~1-10, the scale the SePPO paper
    reports). The layer list is the one in the repository's train_predictor.py and simple_inference.py; the loader
    checks the .pth's keys (`layers.{0,2,4,6,7}.{weight,bias}`) and that the shapes chain from the CLIP's
    projection_dim to one output, and raises ImageScorerError naming any mismatch. Images are preprocessed by the
    CLIP's own image processor (resize, centre crop 224, CLIP normalisation), not by the `clip` package's
    torchvision transform. The prompt is not used. `mlp_path` (default AESTHETIC_MLP, relative to the working
    directory) must be a local file: it is never downloaded."""

    name = "aesthetic"
    hint = "download openai/clip-vit-large-patch14 and pass model_path"

    def __init__(self, model_path: str = "openai/clip-vit-large-patch14", mlp_path: str | None = AESTHETIC_MLP,
                 device: str | None = None):  # fmt: skip
        if mlp_path is None:
            raise ImageScorerError(f"image scorer 'aesthetic' needs mlp_path, the predictor's MLP ({AESTHETIC_HINT})")
        path = Path(mlp_path).expanduser()
        if not path.is_file():
            raise ImageScorerError(f"image scorer 'aesthetic': MLP weights not found at {mlp_path} ({AESTHETIC_HINT})")
        state = _load_state_dict(path, self.name, AESTHETIC_HINT)
        aesthetic_mlp(state, None, str(path))  # the keys and shapes, before the CLIP loads
        super().__init__(model_path, None, device)
        self.mlp = aesthetic_mlp(state, int(self.model.config.projection_dim), str(path)).to(self.device)

    def score(self, images: Any, prompts: Sequence[str]) -> list[float]:
        import torch

        _check_lengths(images, prompts)
        images, out = to_pil(images), []
        for start in range(0, len(images), BATCH):
            inputs = self.processor(images=images[start : start + BATCH], return_tensors="pt").to(self.device)
            with torch.no_grad():
                emb = _projected(self.model.get_image_features(pixel_values=inputs["pixel_values"])).float()
                norm = emb.norm(dim=-1, keepdim=True)
                out.append(self.mlp(emb / torch.where(norm == 0, torch.ones_like(norm), norm)).squeeze(-1))
        return [float(v) for v in torch.cat(out).cpu()]


def _load_state_dict(path: Path, scorer: str, hint: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, or pickled objects other than tensors
        raise ImageScorerError(
            f"image scorer '{scorer}': could not read {path} as a state_dict ({hint}): {err}"
        ) from err


def aesthetic_mlp(state: Any, input_dim: int | None, origin: str) -> Any:
    """The aesthetic predictor's nn.Sequential (eval mode) from its state_dict, after checking its keys and that the
    Linear shapes chain from `input_dim` (the CLIP's projection_dim, 768 for ViT-L/14; None: any) to one output."""
    import torch

    expected = [f"layers.{i}.{p}" for i in AESTHETIC_LINEARS for p in ("weight", "bias")]
    where = f"image scorer 'aesthetic': {origin}"
    if not isinstance(state, dict):
        raise ImageScorerError(f"{where} holds a {type(state).__name__}, not a state_dict ({AESTHETIC_HINT})")
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        raise ImageScorerError(
            f"{where} is not the aesthetic predictor's MLP: missing keys [{', '.join(missing)}], unexpected keys "
            f"[{', '.join(map(str, unexpected))}] (expected {', '.join(expected)})"
        )
    widths = [input_dim]
    for i in AESTHETIC_LINEARS:
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        fits = isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.dim() == 2
        if not (fits and widths[-1] in (None, w.shape[1]) and tuple(b.shape) == (w.shape[0],)):
            shapes = f"weight {tuple(getattr(w, 'shape', ()))}, bias {tuple(getattr(b, 'shape', ()))}"
            want = f"(out, {widths[-1] if widths[-1] is not None else 'in'})"
            why = f" (the input width must be the CLIP's projection_dim, {input_dim})" if i == 0 and input_dim else ""
            raise ImageScorerError(f"{where}: layers.{i} has {shapes}; expected weight {want}, bias (out,){why}")
        widths.append(int(w.shape[0]))
    if widths[-1] != 1:
        raise ImageScorerError(f"{where}: layers.{AESTHETIC_LINEARS[-1]} has {widths[-1]} outputs; expected 1")
    widths[0] = int(state["layers.0.weight"].shape[1])
    modules: list[Any] = []
    for k, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        modules.append(torch.nn.Linear(n_in, n_out))
        if k < len(AESTHETIC_DROPOUTS):
            modules.append(torch.nn.Dropout(AESTHETIC_DROPOUTS[k]))
    mlp = torch.nn.Sequential(*modules)
    mlp.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})  # the MLP's `layers`
    return mlp.eval()


# ------------------------------------------------------------------------------------- package-based


class HPSv2Scorer:
    """HPS v2.0 / v2.1 through the `hpsv2` package (`hpsv2.score(images, prompt, hps_version=...)`, one prompt per
    call); v2.0 by default, the version the SePPO paper reports. `scale: x100` (default) reports the package's score
    x 100, as the SePPO paper prints it (~27 for SD 1.5 images); `scale: raw` the package's own number (~0.27).
    `checkpoint` is a local HPS checkpoint; without one the package downloads it, which fails offline."""

    name = "hpsv2"

    def __init__(self, hps_version: str = "v2.0", checkpoint: str | None = None, scale: str = "x100"):
        if hps_version not in ("v2.0", "v2.1"):
            raise ImageScorerError(f"hpsv2: hps_version must be 'v2.0' or 'v2.1', got {hps_version!r}")
        if scale not in ("x100", "raw"):
            raise ImageScorerError(f"hpsv2: scale must be 'x100' or 'raw', got {scale!r}")
        self.factor = 100.0 if scale == "x100" else 1.0
        self.hpsv2 = _require("hpsv2", "hpsv2", self.name)
        if checkpoint is not None:
            _require_weights(checkpoint, self.name, "checkpoint", f"pass the path of HPS_{hps_version}_compressed.pt")
        self.hps_version = hps_version
        self.checkpoint = checkpoint

    def score(self, images: Any, prompts: Sequence[str]) -> list[float]:
        _check_lengths(images, prompts)
        extra = {"cp": self.checkpoint} if self.checkpoint else {}
        out = []
        for image, prompt in zip(to_pil(images), prompts):
            value = self.hpsv2.score([image], prompt, hps_version=self.hps_version, **extra)
            out.append(self.factor * float(value[0] if isinstance(value, (list, tuple)) else value))
        return out


class ImageRewardScorer:
    """ImageReward through the `image-reward` package: `ImageReward.load(name_or_path).score(prompt, images)`.
    `model` is "ImageReward-v1.0" (downloaded by the package, so online only) or a local .pt checkpoint."""

    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", med_config: str | None = None, device: str | None = None):
        rm = _require("ImageReward", "image-reward", self.name)
        if model != "ImageReward-v1.0":
            _require_weights(model, self.name, "checkpoint", "pass a local ImageReward.pt (and med_config.json)")
        kwargs = {"med_config": med_config} if med_config else {}
        if device:
            kwargs["device"] = device
        self.model = _load(lambda: rm.load(model, **kwargs), self.name, model, "ImageReward.load")

    def score(self, images: Any, prompts: Sequence[str]) -> list[float]:
        _check_lengths(images, prompts)
        out = []
        for image, prompt in zip(to_pil(images), prompts):
            value = self.model.score(prompt, [image])
            out.append(float(value[0] if isinstance(value, (list, tuple)) else value))
        return out


# ------------------------------------------------------------------------------------------- registry

IMAGE_SCORERS: dict[str, Callable[..., ImageScorer]] = {
    "saturation": SaturationScorer,
    "pickscore": PickScoreScorer,
    "hpsv2": HPSv2Scorer,
    "imagereward": ImageRewardScorer,
    "clip_score": ClipScorer,
    "aesthetic": AestheticScorer,
}


def image_scorer(name: str, **kwargs: Any) -> ImageScorer:
    """Build the image scorer `name` (see IMAGE_SCORERS) with its keyword options (weights paths, device)."""
    if name not in IMAGE_SCORERS:
        raise ImageScorerError(unknown_key(name, IMAGE_SCORERS, noun="image scorer"))
    try:
        return IMAGE_SCORERS[name](**kwargs)
    except TypeError as err:
        raise ImageScorerError(f"image scorer '{name}': bad options {sorted(kwargs)}: {err}") from err
