"""Image scorers (reward_models/image.py) and `kind: diffusion` benchmarks: seeded sampling, win rate, the store."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.toy_images import draw_square
from posttrain.errors import DataError
from reward_models.image import ImageScorerError, image_scorer, to_pil, to_tensor

# ------------------------------------------------------------------------------------------ scorers


def squares(saturated: bool, colors=("red", "green", "blue")) -> torch.Tensor:
    import random

    rng = random.Random(0)
    return torch.stack([draw_square(c, saturated, 16, rng) for c in colors])


def test_saturation_scorer_reuses_the_toy_reward_for_tensors_and_pil_images():
    prompts = ["red", "green", "blue"]
    scorer = image_scorer("saturation")
    assert scorer.score(squares(True), prompts) == pytest.approx([1.0] * 3, abs=1e-6)
    assert scorer.score(squares(False), prompts) == pytest.approx([0.25] * 3, abs=0.01)
    assert scorer.score(to_pil(squares(True)), prompts) == pytest.approx([1.0] * 3, abs=0.01)  # 8-bit round trip
    assert scorer.score(torch.zeros(1, 3, 16, 16), ["red"]) == [0.0]  # grey


def test_pil_and_tensor_conversions_round_trip_within_one_level():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    back = to_tensor(to_pil(images))
    assert back.shape == images.shape and (back - images).abs().max() <= 1 / 127.5 + 1e-6


def test_scorers_reject_mismatched_lengths_and_unknown_prompts():
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        image_scorer("saturation").score(torch.zeros(2, 3, 4, 4), ["red"])
    with pytest.raises(ImageScorerError, match="prompts must be one of"):
        image_scorer("saturation").score(torch.zeros(1, 3, 4, 4), ["a cat"])


def test_unknown_scorer_suggests_the_nearest_name():
    with pytest.raises(ImageScorerError, match="unknown image scorer 'pickscor' \\(did you mean 'pickscore'\\?\\)"):
        image_scorer("pickscor")


@pytest.mark.parametrize(
    ("name", "package"),
    [("hpsv2", "hpsv2"), ("imagereward", "image-reward")],
)
def test_package_scorers_name_the_missing_package(name, package):
    pytest.importorskip("torch")
    module = {"hpsv2": "hpsv2", "imagereward": "ImageReward"}[name]
    try:
        __import__(module)
        pytest.skip(f"{module} is installed here")
    except ImportError:
        pass
    with pytest.raises(ImageScorerError, match=f"needs the package '{package}' \\(pip install {package}\\)"):
        image_scorer(name)


@pytest.mark.parametrize("name", ["pickscore", "clip_score"])
def test_clip_scorers_name_the_missing_weights_path(tmp_path, name):
    missing = tmp_path / "no_such_weights"
    with pytest.raises(ImageScorerError, match=f"'{name}': model weights not found at {missing}"):
        image_scorer(name, model_path=str(missing))


def test_clip_scorers_say_which_hub_id_failed_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImageScorerError, match="'pickscore': could not load weights from"):
        image_scorer("pickscore")


# ----------------------------------------------------------------------------------- diffusion eval


@pytest.fixture(scope="module")
def tiny_pixel(tmp_path_factory):
    from posttrain.models.tiny_diffusion import TinyDiffusionSpec, save_tiny_diffusion

    spec = TinyDiffusionSpec(pixel=True, resolution=8, block_out_channels=(16, 16))
    return save_tiny_diffusion(tmp_path_factory.mktemp("px") / "px", spec)


@pytest.fixture(scope="module")
def other_pixel(tmp_path_factory):
    from posttrain.models.tiny_diffusion import TinyDiffusionSpec, save_tiny_diffusion

    spec = TinyDiffusionSpec(pixel=True, resolution=8, block_out_channels=(16, 16), seed=1)
    return save_tiny_diffusion(tmp_path_factory.mktemp("px1") / "px1", spec)


def suite_file(tmp_path, **overrides) -> str:
    import yaml

    entry = {"use": "toy_colors", "data": {"prompts": ["red", "green", "blue"], "repeat": 2},
             "generation": {"steps": 2, "batch_size": 4}, **overrides}  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "diffusion_test", "version": 1, "benchmarks": [entry]}))
    return str(path)


def bench(tmp_path, **overrides):
    from posttrain.evaluation.diffusion import build_diffusion_benchmark
    from posttrain.evaluation.suite import load_suite

    return build_diffusion_benchmark(load_suite(suite_file(tmp_path, **overrides)).benchmarks[0])


def test_seeded_sampling_is_deterministic_and_the_seed_matters(tiny_pixel):
    from posttrain.models.diffusion import load_stack
    from posttrain.rollout.diffusion import sample_images

    stack = load_stack(tiny_pixel)
    prompts = ["red", "green", "blue"]
    a = sample_images(stack, prompts, steps=2, guidance_scale=3.0, seed=5, batch_size=2)
    b = sample_images(load_stack(tiny_pixel), prompts, steps=2, guidance_scale=3.0, seed=5, batch_size=2)
    c = sample_images(stack, prompts, steps=2, guidance_scale=3.0, seed=6, batch_size=2)
    assert a.shape == (3, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_win_rate_of_a_model_against_itself_is_one_half_ties_counting_half(tmp_path, tiny_pixel):
    from posttrain.evaluation.diffusion import evaluate_diffusion, win_rates

    assert win_rates([1.0, 0.5, 0.2], [0.5, 0.5, 0.3]) == [1.0, 0.5, 0.0]
    result = evaluate_diffusion(tiny_pixel, bench(tmp_path, baseline=str(tiny_pixel)))
    assert result.n == 6
    assert result.extra["win_rate"] == 0.5 and result.extra["win_rate_stderr"] == 0.0  # every image ties itself
    assert result.extra["baseline_score_mean"] == pytest.approx(result.accuracy)
    assert all(s["win"] == 0.5 for s in result.samples)


def test_mean_score_has_stderr_and_a_95_interval(tmp_path, tiny_pixel, other_pixel):
    from posttrain.evaluation.diffusion import evaluate_diffusion
    from posttrain.evaluation.metrics import mean_stderr

    result = evaluate_diffusion(tiny_pixel, bench(tmp_path, baseline=str(other_pixel)))
    scores = [s["score"] for s in result.samples]
    mean, stderr = mean_stderr(scores)
    assert result.accuracy == pytest.approx(mean) and result.stderr == pytest.approx(stderr)
    assert result.extra["score_ci95_low"] == pytest.approx(mean - 1.96 * stderr, abs=1e-3)
    wins = [s["win"] for s in result.samples]
    assert result.extra["win_rate"] == pytest.approx(sum(wins) / len(wins))


def test_diffusion_suite_results_land_in_the_store(tmp_path, tiny_pixel):
    from posttrain.evaluation.store import ResultsStore
    from posttrain.evaluation.suite_runner import run_suite

    store = ResultsStore(tmp_path / "results.db")
    outcomes = run_suite(str(tiny_pixel), suite_file(tmp_path, baseline=str(tiny_pixel)), store=store,
                         samples_dir=tmp_path / "samples")  # fmt: skip
    (record,) = store.query(benchmark="toy_colors")
    assert record.id == outcomes[0].record.id and record.n == 6
    assert record.settings["kind"] == "diffusion" and record.settings["scorer"] == "saturation"
    assert record.metrics["win_rate"] == 0.5 and "score_stderr" in record.metrics
    assert "accuracy" not in record.metrics  # a score is stored as a score
    lines = [json.loads(line) for line in open(record.samples_path)]
    assert len(lines) == 6 and {"prompt", "score", "baseline_score", "win"} <= set(lines[0])
    from PIL import Image

    grid = Image.open(record.samples_path.replace(".jsonl", ".png"))  # 6 model images over 6 baseline ones
    assert grid.size == (2 + 6 * (64 + 2), 2 + 2 * (64 + 2))
    run_suite(str(tiny_pixel), suite_file(tmp_path, baseline=str(tiny_pixel)), store=store,
              samples_dir=tmp_path / "samples")  # fmt: skip
    assert len(store.query(benchmark="toy_colors")) == 2  # a re-run appends, recognisable by its settings hash
    assert len({r.settings_hash for r in store.query(benchmark="toy_colors")}) == 1


def test_leaderboard_shows_the_diffusion_benchmark(tmp_path, tiny_pixel):
    from posttrain.evaluation.leaderboard import write_leaderboard
    from posttrain.evaluation.store import ResultsStore
    from posttrain.evaluation.suite_runner import run_suite

    store = ResultsStore(tmp_path / "results.db")
    run_suite(str(tiny_pixel), suite_file(tmp_path), store=store, samples_dir=tmp_path / "samples")
    write_leaderboard(store, tmp_path / "reports", runs_dir=tmp_path / "runs")
    assert "toy_colors" in (tmp_path / "reports" / "leaderboard.md").read_text()


def test_diffusion_benchmarks_validate_their_keys(tmp_path):
    from posttrain.errors import RecipeError
    from posttrain.evaluation.suite import load_suite

    with pytest.raises(RecipeError, match="unknown key 'max_new_tokens'"):
        load_suite(suite_file(tmp_path, generation={"max_new_tokens": 4}))
    path = tmp_path / "bad.yaml"
    path.write_text("benchmarks:\n  - {use: arithmetic, scorer: saturation}\n")
    with pytest.raises(RecipeError, match="apply to kind: diffusion only"):
        load_suite(path)


def test_image_grid_lays_out_rows_upscaled_and_spreads_the_shown_samples():
    from posttrain.evaluation.diffusion import grid_indices
    from reward_models.image import image_grid

    red = draw_square("red", True, 16, __import__("random").Random(0)).unsqueeze(0)
    grid = image_grid([red.repeat(3, 1, 1, 1), red.repeat(2, 1, 1, 1)], min_cell=40, pad=2)
    assert grid.size == (2 + 3 * (48 + 2), 2 + 2 * (48 + 2))  # 16 px upscaled x3 to reach 40
    assert grid.getpixel((2 + 2 * 50 + 10, 2 + 50 + 10)) == (255, 255, 255)  # the short row leaves white
    assert grid_indices(5) == [0, 1, 2, 3, 4]
    assert grid_indices(60, 4) == [0, 20, 39, 59]


def test_prompt_files_and_the_shipped_imagereward_prompt_set(tmp_path):
    from posttrain.evaluation.diffusion import build_diffusion_benchmark, load_prompts
    from posttrain.evaluation.suite import resolve_benchmark

    rows = [{"id": "1", "prompt": "a cat"}, {"id": "2", "prompt": "a dog"}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert load_prompts({"path": str(tmp_path / "p.json"), "column": "prompt"}, "t") == ["a cat", "a dog"]
    with pytest.raises(DataError, match="row 1 has no string 'caption'"):
        load_prompts({"path": str(tmp_path / "p.json"), "column": "caption"}, "t")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog"}\nnot json\n')
    with pytest.raises(DataError, match="p.jsonl: line 4 is not valid JSON"):
        load_prompts({"path": str(tmp_path / "p.jsonl")}, "t")
    bench = build_diffusion_benchmark(resolve_benchmark("imagereward_prompts", "suite"))
    assert len(bench.prompts) == 100 and bench.prompts[0] == "a concept art of a vehicle, cyberpunk"
    assert bench.scorer["name"] == "imagereward" and "shipped" in bench.spec.settings()["data"]  # no local path
    with pytest.raises(DataError, match="no shipped prompt set 'nope' \\(shipped: imagereward_benchmark\\)"):
        load_prompts({"shipped": "nope"}, "t")


# --------------------------------------------------------------------- the SePPO paper's evaluation protocol


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP (random weights, locally built tokenizer and image processor) saved as model + processor dirs,
    with a logit scale of 50 so the two PickScore conventions differ."""
    import math

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from posttrain.models.tiny_diffusion import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(max_length=77)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 16,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "projection_dim": 16},
        projection_dim=16, logit_scale_init_value=math.log(50.0),
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def test_pickscore_is_reported_as_the_raw_cosine_times_100(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = squares(True), ["a red square", "a green square", "a blue square"]
    paper = image_scorer("pickscore", model_path=str(tiny_clip), processor_path=str(tiny_clip))
    snippet = image_scorer("pickscore", model_path=str(tiny_clip), processor_path=str(tiny_clip), scale="logit")
    raw, scaled = paper.score(images, prompts), snippet.score(images, prompts)
    # The model's own forward gives exp(logit_scale) x cos (its logits): dividing by its scale of 50 recovers cos.
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    inputs = processor(images=to_pil(images), text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal()
    assert raw == pytest.approx((100.0 * logits / 50.0).tolist(), abs=1e-4)
    assert scaled == pytest.approx(logits.tolist(), abs=1e-4)  # the authors' snippet: the model's own scale
    assert all(-100.0 <= r <= 100.0 for r in raw) and len({round(r, 4) for r in raw}) == 3
    with pytest.raises(ImageScorerError, match="scale must be 'cosine100' or 'logit'"):
        image_scorer("pickscore", model_path=str(tiny_clip), processor_path=str(tiny_clip), scale="exp")


def test_hps_scores_with_v2_0_by_default_reported_x100_as_the_paper_prints_it(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("hpsv2")
    fake.score = lambda images, prompt, hps_version, **kw: calls.append(hps_version) or [0.2734]
    monkeypatch.setitem(sys.modules, "hpsv2", fake)
    assert image_scorer("hpsv2").score(squares(True)[:1], ["red"]) == pytest.approx([27.34]) and calls == ["v2.0"]
    assert image_scorer("hpsv2", scale="raw").score(squares(True)[:1], ["red"]) == [0.2734]  # the package's number
    image_scorer("hpsv2", hps_version="v2.1").score(squares(True)[:1], ["red"])
    assert calls[-1] == "v2.1"
    with pytest.raises(ImageScorerError, match="hps_version must be 'v2.0' or 'v2.1'"):
        image_scorer("hpsv2", hps_version="v3")
    with pytest.raises(ImageScorerError, match="scale must be 'x100' or 'raw', got 'percent'"):
        image_scorer("hpsv2", scale="percent")


def test_the_paper_suites_point_at_their_sources_with_the_paper_sampling(tmp_path, monkeypatch):
    import sys
    import types

    from posttrain.evaluation.diffusion import build_diffusion_benchmark
    from posttrain.evaluation.suite import load_suite
    from tests.conftest import REPO

    suite = load_suite(str(REPO / "eval" / "suites" / "seppo_paper.yaml"))
    by_name = {b.name: b for b in suite.benchmarks}
    assert {b.data.get("dataset") or b.data.get("hpsv2_benchmark") for b in suite.benchmarks} == {
        "yuvalkirstain/pickapic_v2_no_images", "nateraw/parti-prompts", "all"}  # fmt: skip
    for bench in suite.benchmarks:
        g = bench.generation
        assert (g["scheduler"], g["steps"], g["guidance_scale"], g["seed"], g["n"], g["dtype"]) == (
            "pipeline", 50, 7.5, 0, 1, "fp16")  # fmt: skip
    scorers = sorted((b.name, (b.scorer if isinstance(b.scorer, str) else b.scorer["name"])) for b in suite.benchmarks)
    assert {s for _, s in scorers} == {"pickscore", "hpsv2", "imagereward", "aesthetic"} and len(scorers) == 12
    assert by_name["hps_benchmark_hps"].scorer == {"name": "hpsv2", "hps_version": "v2.0"}  # reported x 100
    for prompts in ("pickapic_validation_unique", "partiprompts", "hps_benchmark"):  # every scorer on every set
        assert {b.name for b in suite.benchmarks if b.name.startswith(prompts)} == {
            f"{prompts}_{s}" for s in ("pickscore", "hps", "imagereward", "aesthetic")}  # fmt: skip
        assert by_name[f"{prompts}_aesthetic"].scorer == "aesthetic"  # a string: not merged with hps_version
    # Offline, a hub source fails through the data layer with a clear message.
    with pytest.raises(DataError, match="pickapic_v2_no_images.*pass a local path"):
        build_diffusion_benchmark(by_name["pickapic_validation_unique_pickscore"])
    # The HPS benchmark's prompts come from the hpsv2 package, in style order.
    fake = types.ModuleType("hpsv2")
    fake.benchmark_prompts = lambda style: {
        "photo": ["p1"],
        "anime": ["a1", "a2"],
        "paintings": [],
        "concept-art": ["c"],
    }
    monkeypatch.setitem(sys.modules, "hpsv2", fake)
    assert build_diffusion_benchmark(by_name["hps_benchmark_hps"]).prompts == ["a1", "a2", "c", "p1"]


def test_prompts_from_a_dataset_column_through_the_data_layer(tmp_path):
    from posttrain.evaluation.diffusion import load_prompts

    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"caption": c, "id": i}) + "\n" for i, c in enumerate(["a", "b", "a", "c"])))
    assert load_prompts({"dataset": str(path), "column": "caption"}, "t") == ["a", "b", "a", "c"]
    assert load_prompts({"dataset": str(path), "column": "caption", "unique": True}, "t") == ["a", "b", "c"]
    with pytest.raises(DataError, match="has no column 'Prompt' \\(columns: caption, id\\)"):
        load_prompts({"dataset": str(path), "column": "Prompt"}, "t")


def test_pipeline_scheduler_samples_with_the_models_own_scheduler_class(tiny_pixel, tmp_path):
    import shutil

    from diffusers import PNDMScheduler

    from posttrain.models.diffusion import load_stack
    from posttrain.rollout.diffusion import make_scheduler, sample_images

    model = tmp_path / "sd_like"
    shutil.copytree(tiny_pixel, model)
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    PNDMScheduler.from_config(config).save_pretrained(model / "scheduler")  # what SD 1.5's pipeline dir holds
    stack = load_stack(model)
    assert stack.scheduler_class == "PNDMScheduler" and type(stack.scheduler).__name__ == "DDPMScheduler"  # training
    assert type(make_scheduler(stack.scheduler.config, "pipeline", stack.scheduler_class)).__name__ == "PNDMScheduler"
    assert type(make_scheduler(stack.scheduler.config, "ddim")).__name__ == "DDIMScheduler"
    a = sample_images(stack, ["red", "blue"], 10, 3.0, seed=0, device="cpu", scheduler="pipeline")
    b = sample_images(stack, ["red", "blue"], 10, 3.0, seed=0, device="cpu", scheduler="pipeline")
    c = sample_images(stack, ["red", "blue"], 10, 3.0, seed=0, device="cpu", scheduler="ddim")
    assert torch.equal(a, b) and not torch.allclose(a, c) and a.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="'ddim' or 'pipeline'"):
        make_scheduler(stack.scheduler.config, "euler")
