"""final/README.md: a run's model card for the Hugging Face Hub, built with huggingface_hub's card API.

The metadata header (what the Hub indexes): `base_model` (the recipe's `card.base_model`, else `model.path` when it is
a hub id: the Hub rejects a local path), `library_name` and `pipeline_tag` from the kind of model the trainer trains
(`peft` for a LoRA adapter), `tags` (posttrain, the trainer, `card.tags`), `datasets` (`card.datasets` and the hub
datasets the data sources name), `license` and `language` from `card:`.

The body: the recipe's name and description, the method in a paragraph with its paper (the trainer's `SPEC`), how it
was trained (base model, data, rewards, the settings the recipe gave, steps), the held-out metrics before and after
training (the `<name>:before` and `<name>:after` rows of metrics.jsonl, so a resumed run keeps its "before"), the
figures, how to load it, and the resolved recipe. Figures are linked under `report/`: `posttrain push` uploads the
run's report there, beside final/ at the repo's root (`report_files` is the one list both use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.preflight import is_hub_source
from posttrain.recipe import Recipe, to_yaml
from posttrain.registry import TrainerSpec, get_spec
from posttrain.runs import RunDir, write_atomic

REPORT_DIR = "report"  # the run's report in the Hub repo, beside final/'s files at its root
CARD_NAME = "README.md"
# What the Hub reads per kind of model a trainer trains (TrainerSpec.model): (library_name, pipeline_tag).
_HUB_KIND = {
    "causal_lm": ("transformers", "text-generation"),
    "sequence_classifier": ("transformers", "text-classification"),
    "diffusion": ("diffusers", "text-to-image"),
}
_AUTO_CLASS = {"causal_lm": "CausalLM", "sequence_classifier": "SequenceClassification"}
_NOT_METRICS = ("step", "stage", "time")


def report_files(run: RunDir) -> dict[str, Path]:
    """The run's files `posttrain push` uploads beside final/, by their path in the Hub repo: report.md with its
    plots, the sample grids of eval/ and the resolved recipe, under `report/` (report.md's own links still resolve)."""
    found = [run.path / "report.md", run.path / "recipe.resolved.yaml", *sorted(run.path.glob("*.png"))]
    files = {f"{REPORT_DIR}/{path.name}": path for path in found if path.is_file()}
    files.update({f"{REPORT_DIR}/eval/{path.name}": path for path in sorted(run.eval_dir.glob("*.png"))})
    return files


def write_model_card(run: RunDir, recipe: Recipe, result: Any) -> Path:
    """Write final/README.md atomically (`result`: the run's RunResult, for its step count and training time)."""
    path = run.final / CARD_NAME
    write_atomic(path, str(build_model_card(run, recipe, result)))
    return path


def build_model_card(run: RunDir, recipe: Recipe, result: Any):
    """The run's `huggingface_hub.ModelCard` (module docstring)."""
    from huggingface_hub import ModelCard

    spec = get_spec(recipe.trainer, recipe.where)
    body = [
        f"# {recipe.name}",
        "",
        *([recipe.description, ""] if recipe.description else []),
        "## Method",
        "",
        method_paragraph(spec, recipe),
        "",
        "## Training",
        "",
        *training_lines(recipe, result),
        "",
        "## Evaluation",
        "",
        *held_out_table(run.read_metrics(), recipe.name),
        "",
        *figure_lines(run),
        _HOW_TO,
        "",
        "```python",
        load_snippet(spec, run.final),
        "```",
        "",
        "## Recipe",
        "",
        f"The resolved recipe, every default filled in (`posttrain train {REPORT_DIR}/recipe.resolved.yaml` "
        "reproduces the run):",
        "",
        "```yaml",
        resolved_recipe(run, recipe).rstrip("\n"),
        "```",
    ]
    header = card_metadata(recipe, spec, run.final).to_yaml()
    return ModelCard(f"---\n{header}\n---\n\n" + "\n".join(body) + "\n")


def card_metadata(recipe: Recipe, spec: TrainerSpec, final: Path):
    """The card's `ModelCardData` (module docstring); empty fields are left out."""
    from huggingface_hub import ModelCardData

    library, pipeline = _HUB_KIND[spec.model]
    if (final / "adapter_config.json").is_file():
        library = "peft"  # a LoRA run's final/ is the adapter: the Hub lists it under peft, on its base model
    card = recipe.card
    sources = [recipe.data.train, recipe.data.eval, recipe.eval.data]
    datasets = [*card.datasets, *(s["path"] for s in sources if s and _hub_id(recipe, s.get("path")))]
    tags = ["posttrain", spec.name, *card.tags]
    return ModelCardData(
        base_model=card.base_model or base_model_id(recipe),
        library_name=library,
        pipeline_tag=pipeline,
        license=card.license,
        language=list(card.language) or None,
        datasets=list(dict.fromkeys(datasets)) or None,
        tags=list(dict.fromkeys(tags)),
    )


def base_model_id(recipe: Recipe) -> str | None:
    """`model.path` when it is a hub id (None for a local dir or a tiny model)."""
    return recipe.model.path if _hub_id(recipe, recipe.model.path) else None


def _hub_id(recipe: Recipe, value: Any) -> bool:
    return isinstance(value, str) and is_hub_source(recipe, {"path": value})


def method_paragraph(spec: TrainerSpec, recipe: Recipe) -> str:
    """What the trainer does, in its own words (`SPEC.description`), with its paper (`SPEC.paper`)."""
    text = f"Trained with posttrain's `{spec.name}` trainer: {spec.description}."
    if recipe.rewards:
        rewards = ", ".join(f"`{r.name}` (weight {r.weight:g})" for r in recipe.rewards)
        text += f" Rewards: {rewards}."
    if spec.paper:
        text += f" Paper: {spec.paper}."
    return text


def training_lines(recipe: Recipe, result: Any) -> list[str]:
    """Base model, data, LoRA, the settings the recipe gave (the rest are the library's defaults) and the run."""
    lines = [f"- Base model: {_model_text(recipe)}"]
    for label, spec in (("Training data", recipe.data.train), ("Held-out data", recipe.eval.data or recipe.data.eval)):
        if spec:
            lines.append(f"- {label}: {_source_text(recipe, spec)}")
    if recipe.model.lora is not None:
        lines.append(f"- LoRA adapter: r={recipe.model.lora.r}, alpha={recipe.model.lora.alpha}")
    settings = {**recipe.algorithm, **recipe.training}
    if settings:
        lines.append("- Settings the recipe sets: " + ", ".join(f"`{k}: {v}`" for k, v in settings.items()))
    seconds = getattr(result, "train_seconds", None)
    took = f" in {seconds:.3g} s of training" if seconds else ""
    lines.append(f"- {result.global_step} optimizer steps{took}, seed {recipe.seed}")
    return lines


def _model_text(recipe: Recipe) -> str:
    if recipe.model.tiny is not None:
        return f"a tiny model posttrain builds itself (`model.tiny: {recipe.model.tiny}`)"
    hub_id = base_model_id(recipe)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    return f"a local model (`{Path(str(recipe.model.path)).name}`)"


def _source_text(recipe: Recipe, spec: dict[str, Any]) -> str:
    """A data source in words: posttrain's synthetic task, a hub dataset (linked) or a local file, and its options."""
    path = spec.get("path")
    if spec.get("synthetic"):
        what = f"posttrain's synthetic `{spec['synthetic']}` task"
    elif _hub_id(recipe, path):
        what = f"[{path}](https://huggingface.co/datasets/{path})"
    else:
        what = f"a local file or dir (`{Path(str(path)).name}`)"
    options = [
        f"{k}: {v}" for k, v in spec.items() if k not in ("path", "synthetic") and not isinstance(v, dict | list)
    ]
    return what + (f" ({', '.join(options)})" if options else "")


def held_out_table(records: list[dict[str, Any]], stage: str) -> list[str]:
    """Markdown rows: each held-out metric the run recorded, before and after training, and the change."""
    before, after = _tagged(records, f"{stage}:before"), _tagged(records, f"{stage}:after")
    if not before and not after:
        return ["No held-out evaluation was recorded (the recipe names no `data.eval`, `eval.data` or `eval.suite`)."]
    lines = ["| held-out metric | before | after | change |", "|---|---|---|---|"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        change = "–" if a is None or b is None else f"{a - b:+.4g}"
        lines.append(f"| {key} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return lines


STORE_HEADING = "## Benchmarks (results store)"
_HOW_TO = "## How to use"


def store_table(store_path: Path, final: Path) -> list[str]:
    """The results store's newest result per benchmark for the model in `final` (`posttrain eval --model` of that
    dir, from any working directory), as a markdown section; nothing when the store has none."""
    from posttrain.evaluation.store import ResultsStore

    if not store_path.is_file():
        return []
    target = final.resolve()
    found = [r for r in ResultsStore(store_path, create=False).latest() if _same_model(r, target)]
    if not found:
        return []
    lines = [STORE_HEADING, "", f"`posttrain eval` results for this model in `{store_path}` (the newest per benchmark):",
             "", "| benchmark | suite | metric | value | n |", "|---|---|---|---|---|"]  # fmt: skip
    for record in sorted(found, key=lambda r: r.benchmark):
        for key, value in sorted(record.metrics.items()):
            if _is_number(value):
                lines.append(
                    f"| {record.benchmark} | {record.suite or '–'} | {key} | {_fmt(float(value))} | {record.n} |"
                )
    return [*lines, ""]


def _same_model(record: Any, target: Path) -> bool:
    candidates = [record.model] + ([str(Path(record.run_dir) / "final")] if record.run_dir else [])
    return any(Path(c).expanduser().resolve() == target for c in candidates if c)


def with_store_table(card_text: str, table: list[str]) -> str:
    """`card_text` with its results-store section replaced by `table` (placed before "How to use")."""
    if STORE_HEADING in card_text:
        head, rest = card_text.split(STORE_HEADING, 1)
        card_text = head + rest[rest.index("\n## ") + 1 :] if "\n## " in rest else head
    if not table:
        return card_text
    block = "\n".join(table) + "\n"
    if _HOW_TO in card_text:
        head, rest = card_text.split(_HOW_TO, 1)
        return head + block + _HOW_TO + rest
    return card_text.rstrip("\n") + "\n\n" + block


def _tagged(records: list[dict[str, Any]], tag: str) -> dict[str, float]:
    """The metrics of the last record logged as `tag` (a resumed run may log its "after" again)."""
    found: dict[str, float] = {}
    for row in records:
        if row.get("stage") == tag:
            found = {k: float(v) for k, v in row.items() if k not in _NOT_METRICS and _is_number(v)}
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def figure_lines(run: RunDir) -> list[str]:
    """Image links to the run's plots and sample grids, as `posttrain push` lays them out in the repo."""
    lines = []
    for name in report_files(run):
        if name.endswith(".png"):
            lines += [f"![{Path(name).stem.replace('.', ' ')}]({name})", ""]
    return lines


def load_snippet(spec: TrainerSpec, final: Path) -> str:
    """Python that loads the model from the Hub repo (or the run's final/ dir)."""
    repo = "repo = \"REPO_ID\"  # this repo's id on the Hub, or the run's final/ dir"
    if spec.model == "diffusion" and (final / "model_index.json").is_file():
        return "\n".join(["from diffusers import DiffusionPipeline", "", repo,
                          "pipe = DiffusionPipeline.from_pretrained(repo)", 'image = pipe("a prompt").images[0]'])  # fmt: skip
    if spec.model == "diffusion":  # posttrain's pixel-space toy stack: no pipeline, each part in its own subfolder
        return "\n".join(["from diffusers import UNet2DConditionModel", "", repo,
                          'unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet")'])  # fmt: skip
    auto = "AutoModelFor" + _AUTO_CLASS[spec.model]
    if (final / "adapter_config.json").is_file():  # peft loads the base model the adapter names, then the adapter
        auto = auto.replace("AutoModel", "AutoPeftModel")
        imports = [f"from peft import {auto}", "from transformers import AutoTokenizer"]
    else:
        imports = [f"from transformers import {auto}, AutoTokenizer"]
    if spec.model == "causal_lm":
        use = ['inputs = tokenizer("Hello", return_tensors="pt")',
               "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))"]  # fmt: skip
    else:  # a reward model: one scalar per sequence (the input layout its trainer uses is in the recipe)
        use = ['score = model(**tokenizer("a prompt and a response", return_tensors="pt")).logits[0, 0]']
    load = [f"model = {auto}.from_pretrained(repo)", "tokenizer = AutoTokenizer.from_pretrained(repo)"]
    return "\n".join([*imports, "", repo, *load, *use])


def resolved_recipe(run: RunDir, recipe: Recipe) -> str:
    path = run.path / "recipe.resolved.yaml"
    return path.read_text() if path.is_file() else to_yaml(recipe)
