"""`posttrain train RECIPE --rehearse`: run any recipe for 2 optimizer steps on this machine's CPUs, under its own
accelerate setup shrunk to 2 processes, before GPU time is spent on it.

What a GPU recipe needs that a CPU lacks is substituted, and each substitution is said:
- the model: a tiny random model of the same architecture family (from the model dir's config.json or the hub
  shapes posttrain knows, `posttrain.models.memory.KNOWN_SHAPES`), with the recipe's options kept: LoRA, gradient
  checkpointing, the reference model when `beta > 0`; a diffusion model becomes a tiny latent stack;
- the launch: the recipe's accelerate config with 2 processes, fp32 and no offload, ZeRO stage kept (DDP when the
  recipe names none);
- data that is not local (a hub dataset, a file an earlier step writes): a few synthetic rows of the schema the
  trainer reads (a schema it cannot know, such as a custom field list, is refused before anything runs);
  local data is cut to its first rows;
- model rewards (POLAR, sequence classifiers): tiny stand-ins of the same kind; eval suites: a few samples, hub
  benchmark data synthesised, model-based image scorers replaced by the analytic saturation scorer;
- vLLM rollouts: the transformers backend (vLLM needs a CUDA GPU; the one thing a rehearsal here cannot try).

Then it trains: the first launch stops right after checkpoint-1 is written (every process exits, as in a crash),
the second resumes it with `--resume` to step 2, writes final/ and runs the after-training evaluation. A failure
prints the launch's log tail with the real error. Hand-written: no library rehearses a training config; the
launches themselves are `accelerate launch`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.data.stand_ins import pickapic_rows, text_rows, write_rows
from posttrain.errors import PosttrainError, RecipeError
from posttrain.models.stand_ins import model_family, stand_in_reward_model
from posttrain.recipe import Recipe
from posttrain.runs import loadable_model_dir, training_losses

STEPS = 2  # optimizer steps a rehearsal trains: a checkpoint at step 1, resumed to step 2
ROWS = 32  # synthetic rows per data source; local sources are cut to this many
EVAL_ROWS = 4  # rows per held-out set and suite benchmark
MAX_NEW_TOKENS = 16
IMAGE_SCORERS_WITH_WEIGHTS = ("pickscore", "hpsv2", "imagereward", "clip")
MODEL_REWARDS = ("polar", "sequence_classifier")
DDP_CONFIG = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
              "machine_rank": 0, "num_processes": 2, "mixed_precision": "no", "rdzv_backend": "static",
              "same_network": True, "main_training_function": "main", "use_cpu": False}  # fmt: skip


class RehearsalError(RecipeError):
    """The recipe cannot be rehearsed here (before anything runs): data of a schema that cannot be synthesised."""


class RehearsalFailed(PosttrainError):
    """A rehearsal launch failed: the message ends with its log's tail (the real error)."""


@dataclass
class Rehearsal:
    """A prepared rehearsal: the rewritten recipe and launch config in `workdir`, and what was changed."""

    source: Recipe
    workdir: Path
    recipe_path: Path
    accelerate_config: Path
    substituted: list[str] = field(default_factory=list)
    exercised: list[str] = field(default_factory=list)
    not_rehearsed: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    def lines(self) -> list[str]:
        out = [f"rehearsal of {self.source.where} in {self.workdir}"]
        out += ["substituted:"] + [f"  - {s}" for s in self.substituted]
        out += ["exercised:"] + [f"  - {s}" for s in self.exercised]
        out += ["not rehearsed:"] + [f"  - {s}" for s in self.not_rehearsed or ["nothing"]]
        return out


# ------------------------------------------------------------------------------------------------- prepare


def prepare_rehearsal(recipe: Recipe, workdir: str | Path, accelerate_config: str | None = None) -> Rehearsal:
    """Write the rehearsal of `recipe` into `workdir` (emptied first): tiny models, synthetic data, the shrunk
    launch config and the rewritten recipe, validated. Raises RehearsalError for what cannot be rehearsed."""
    from posttrain.registry import get_spec, load_and_validate

    if "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RehearsalError(
            f"{recipe.where}: --rehearse starts its own 2-process `accelerate launch`; run `posttrain train "
            "RECIPE --rehearse` directly, not under accelerate launch or torchrun"
        )
    spec = get_spec(recipe.trainer, recipe.where)
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "data").mkdir(parents=True)
    raw = copy.deepcopy(recipe.raw)
    raw.pop("extends", None)
    rehearsal = Rehearsal(recipe, workdir, workdir / "recipe.yaml", workdir / "accelerate.yaml")
    builder = _Builder(recipe, spec, raw, rehearsal)
    builder.check_data()  # refuse what cannot be synthesised before any model is built
    builder.launch(accelerate_config)
    builder.model()
    builder.training()
    builder.data()
    builder.rewards()
    builder.evaluation()
    raw["output_dir"] = str(rehearsal.run_dir)
    header = f"# posttrain --rehearse of {recipe.where}: {STEPS} optimizer steps on the CPU (see {workdir}/README)\n"
    rehearsal.recipe_path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    (workdir / "README").write_text("\n".join(rehearsal.lines()) + "\n")
    load_and_validate(rehearsal.recipe_path)  # what the launches will read, checked here first
    return rehearsal


class _Builder:
    """Rewrites the recipe mapping section by section, noting each substitution."""

    def __init__(self, recipe: Recipe, spec: Any, raw: dict[str, Any], rehearsal: Rehearsal):
        self.recipe, self.spec, self.raw, self.out = recipe, spec, raw, rehearsal
        self.images = spec.train_schema is None  # a trainer that reads images (seppo), not text rows
        self.rng = random.Random(recipe.seed)

    def note(self, text: str) -> None:
        self.out.substituted.append(text)

    def did(self, text: str) -> None:
        self.out.exercised.append(text)

    # --- data: refused first ---------------------------------------------------------------------------

    def sources(self) -> list[tuple[str, dict[str, Any], tuple[str, ...] | None]]:
        """(section, source, fields a synthetic stand-in needs) of each data source the recipe names."""
        from posttrain.data.schemas import SCHEMAS
        from posttrain.preflight import reward_columns

        found = []
        data = self.raw.get("data") or {}
        if isinstance(data.get("train"), dict):
            if self.images:
                fields = None
            else:
                read = [c for r in self.recipe.rewards for c in reward_columns(r.name, r.kwargs)]
                extra = ("answer",) if self.spec.needs_rewards else ()
                fields = tuple(dict.fromkeys((*SCHEMAS[self.spec.train_schema], *extra, *read)))
            found.append(("data.train", data["train"], fields))
        evaluation = self.raw.get("eval") or {}
        held_out = ("eval.data", evaluation["data"]) if isinstance(evaluation.get("data"), dict) else None
        if held_out is None and isinstance(data.get("eval"), dict):
            held_out = ("data.eval", data["eval"])
        if held_out is not None and self.spec.eval_schema is not None:
            slice_column = evaluation.get("slice_column")
            fields = (*SCHEMAS[self.spec.eval_schema], *([slice_column] if slice_column else []))
            found.append((*held_out, tuple(dict.fromkeys(fields))))
        return found

    def is_local(self, source: Mapping[str, Any]) -> bool:
        if "synthetic" in source:
            return True
        path = source.get("path")
        return isinstance(path, str) and Path(self.recipe.resolve_path(path)).exists()

    def check_data(self) -> None:
        from posttrain.data.images import FORMATS as IMAGE_FORMATS
        from posttrain.data.sources import FORMATS

        for section, source, _ in self.sources():
            if self.is_local(source):
                continue
            schema = source.get("schema")
            if schema is not None and not isinstance(schema, str):
                raise RehearsalError(
                    f"{self.recipe.where}: {section}: its schema is a custom field list {list(schema)}, whose "
                    "values cannot be synthesised; make the data local (a rehearsal reads its first rows) or name "
                    "a schema"
                )
            known = IMAGE_FORMATS if self.images and section == "data.train" else FORMATS
            fmt = source.get("format", "pickapic" if self.images and section == "data.train" else None)
            if fmt is not None and fmt not in known:
                raise RehearsalError(
                    f"{self.recipe.where}: {section}: format '{fmt}' cannot be synthesised (known: {', '.join(known)})"
                )

    # --- launch ----------------------------------------------------------------------------------------

    def launch(self, override: str | None) -> None:
        path = override or (self.recipe.resolve_path(self.recipe.accelerate_config) if self.recipe.accelerate_config else None)  # fmt: skip
        config = dict(DDP_CONFIG)
        if path is None:
            self.note("launch: no accelerate_config in the recipe: DDP, 2 processes")
        else:
            given = yaml.safe_load(Path(path).read_text()) or {}
            kind = given.get("distributed_type", "NO")
            if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
                stage = (given.get("deepspeed_config") or {}).get("zero_stage")
                self.note(f"launch: {path} (DeepSpeed ZeRO-{stage}) -> DDP, 2 CPU processes: DeepSpeed is not installed")  # fmt: skip
                self.out.not_rehearsed.append(
                    f"DeepSpeed ZeRO-{stage} (not installed here: DS_BUILD_OPS=0 pip install 'posttrain[deepspeed]' "
                    "to rehearse it on the CPU)"
                )
            elif kind == "DEEPSPEED":
                config = copy.deepcopy(given)
                ds = config.setdefault("deepspeed_config", {})
                offload = [k for k in ("offload_optimizer_device", "offload_param_device") if ds.get(k) not in (None, "none")]  # fmt: skip
                for key in offload:
                    ds[key] = "none"
                config.update(num_processes=2, num_machines=1, machine_rank=0, mixed_precision="no", use_cpu=False)
                config.pop("main_process_ip", None)
                dropped = f"; {', '.join(offload)} -> none" if offload else ""
                self.note(
                    f"launch: {path} (DeepSpeed ZeRO-{ds.get('zero_stage')}, {given.get('num_processes', 1)} "
                    f"processes, {given.get('mixed_precision', 'no')}) -> ZeRO-{ds.get('zero_stage')} on 2 CPU "
                    f"processes, fp32 (gloo){dropped}"
                )
            else:
                self.note(f"launch: {path} ({kind}, {given.get('num_processes', 1)} processes) -> DDP, 2 CPU processes")
        self.out.accelerate_config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.raw["accelerate_config"] = str(self.out.accelerate_config)
        stage = (config.get("deepspeed_config") or {}).get("zero_stage") if config["distributed_type"] == "DEEPSPEED" else None  # fmt: skip
        self.did(f"accelerate launch, 2 processes, {'DeepSpeed ZeRO-' + str(stage) if stage else 'DDP'} (gloo)")

    # --- model -----------------------------------------------------------------------------------------

    def model(self) -> None:
        model = self.raw.setdefault("model", {})
        section = self.recipe.model
        if self.images:
            self.diffusion_model(model)
        elif section.tiny is not None:
            self.did(f"model: the recipe's tiny model {section.tiny}")
        else:
            from posttrain.models.tiny import save_family_model

            source = self.recipe.resolve_path(section.path or "")
            family, how = model_family(source)
            path, built = save_family_model(self.out.workdir / "model", family, seed=self.recipe.seed)
            fallback = f"; {family} is not a transformers class: llama stands in" if built != family else ""
            self.note(f"model: {source} -> a tiny random {built} model (2 layers, hidden 64; family {how}{fallback})")
            model["path"] = str(path)
            if model.pop("trust_remote_code", False):
                self.note("model.trust_remote_code: true -> false (the stand-in is a transformers class)")
        if model.get("dtype", "auto") not in ("auto", "float32"):
            self.note(f"model.dtype: {model['dtype']} -> float32 (the CPU trains in fp32)")
            model["dtype"] = "float32"
        lora = section.lora
        self.did(f"LoRA r={lora.r} on {lora.target_modules}" if lora else "full fine-tuning (no LoRA)")
        if section.gradient_checkpointing:
            self.did("gradient checkpointing")

    def diffusion_model(self, model: dict[str, Any]) -> None:
        tiny = model.get("tiny")
        if tiny is None:
            self.note(f"model: {self.recipe.model.path} -> a tiny latent diffusion stack (UNet, VAE, CLIP text "
                      "encoder; 32 px)")  # fmt: skip
            model.pop("path", None)
            model["tiny"] = {"pixel": False, "resolution": 32}
            return
        pretrain = tiny.get("pretrain")
        if isinstance(pretrain, dict):
            tiny["pretrain"] = {**pretrain, "n": min(int(pretrain.get("n", 64)), 64), "updates": 2}
            self.note("model.tiny.pretrain: 2 updates on 64 images (the toy base is not trained to a useful point)")
        self.did(f"model: the recipe's tiny diffusion stack {tiny}")

    # --- training --------------------------------------------------------------------------------------

    def training(self) -> None:
        training = self.raw.setdefault("training", {})
        algorithm = self.raw.setdefault("algorithm", {})
        if training.get("precision", "auto") not in ("auto", "fp32"):
            self.note(f"training.precision: {training['precision']} -> fp32 (CPU)")
            training["precision"] = "fp32"
        if self.images:
            self.seppo_training(training, algorithm)
            return
        old_accum = int(training.get("gradient_accumulation_steps", 1))
        accum = min(old_accum, 2)
        per_device = int(training.get("per_device_train_batch_size", 8))
        if self.spec.needs_rewards:  # generation groups: each micro-batch one whole group per process
            rollout = self.raw.setdefault("rollout", {})
            groups = min(int(rollout.get("num_generations", 8)), 4)
            if groups != rollout.get("num_generations", 8):
                self.note(f"rollout.num_generations: {rollout.get('num_generations', 8)} -> {groups}")
            rollout["num_generations"] = groups
            per_device_new = groups
            for where in (algorithm, training):
                steps = where.get("steps_per_generation")
                if steps is not None and int(steps) > old_accum:  # several optimizer steps per generation
                    where["steps_per_generation"] = STEPS * accum
                    self.note(f"steps_per_generation: {steps} ({int(steps) // old_accum} optimizer steps per "
                              f"generation) -> {STEPS * accum} (both rehearsed steps from one generation)")  # fmt: skip
                    self.did("off-policy optimizer steps: the second step trains on the first step's generation")
                elif steps is not None:
                    where["steps_per_generation"] = accum
                if where.pop("generation_batch_size", None) is not None:
                    self.note("generation_batch_size: removed (it follows the batch sizes)")
            if algorithm.get("max_generation_rounds") is not None:
                algorithm["max_generation_rounds"] = min(int(algorithm["max_generation_rounds"]), 2)
            if algorithm.get("dynamic_sampling"):
                self.did("dynamic sampling (at most 2 rounds)")
        else:
            per_device_new = min(per_device, 2)
        training.update(per_device_train_batch_size=per_device_new, gradient_accumulation_steps=accum)
        self.note(f"batch: {per_device} per device x {old_accum} accumulation -> {per_device_new} x {accum}")
        for key in ("num_train_epochs", "eval_steps", "save_total_limit"):
            training.pop(key, None)
        training.update(max_steps=STEPS, save_steps=1, logging_steps=1)
        self.note(f"training: {STEPS} optimizer steps, a checkpoint each")
        beta = algorithm.get("beta")
        if self.recipe.trainer == "dpo" or (beta is not None and float(beta) > 0):
            self.did(f"a reference model (beta = {beta if beta is not None else 'default'})")
        if isinstance(algorithm.get("max_length"), int) and algorithm["max_length"] > 1024:
            self.note(f"algorithm.max_length: {algorithm['max_length']} -> 1024")
            algorithm["max_length"] = 1024
        if isinstance(algorithm.get("max_response_length"), int) and algorithm["max_response_length"] > 256:
            self.note(f"algorithm.max_response_length: {algorithm['max_response_length']} -> 256")
            algorithm["max_response_length"] = 256
        rollout = self.raw.get("rollout")
        if rollout is not None or self.spec.needs_rewards:
            self.rollout(self.raw.setdefault("rollout", {}))

    def seppo_training(self, training: dict[str, Any], algorithm: dict[str, Any]) -> None:
        before = (algorithm.get("num_stages", 7), algorithm.get("updates_per_stage", 30))
        algorithm.update(num_stages=STEPS, updates_per_stage=1)
        if int(algorithm.get("sample_steps", 20)) > 2:
            algorithm["sample_steps"] = 2
        per_device = int(training.get("per_device_train_batch_size", 1))
        accum = int(training.get("gradient_accumulation_steps", 1))
        training.update(per_device_train_batch_size=min(per_device, 2), gradient_accumulation_steps=min(accum, 2),
                        save_stages=1, logging_steps=1)  # fmt: skip
        self.note(f"stages: {before[0]} x {before[1]} updates -> {STEPS} x 1 (a checkpoint after each); reference "
                  f"sampling 2 DDIM steps; batch {per_device} x {accum} -> {min(per_device, 2)} x {min(accum, 2)}")  # fmt: skip
        if training.pop("resolution", None) is not None:
            self.note("training.resolution: the tiny stack's own size")
        self.did(f"SePPO variant {algorithm.get('variant', 'seppo')}, reference pool '{algorithm.get('reference', 'uniform')}'")  # fmt: skip

    def rollout(self, rollout: dict[str, Any]) -> None:
        if rollout.get("backend") == "vllm":
            rollout["backend"] = "hf"
            mode = (rollout.get("vllm") or {}).get("mode", "colocate")
            self.note("rollout.backend: vllm -> hf (transformers generate)")
            self.out.not_rehearsed.append(
                f"vLLM rollouts ({mode} mode): vLLM needs a CUDA GPU; they run for the first time on the GPU"
            )
        tokens = int(rollout.get("max_new_tokens", 256))
        if tokens > MAX_NEW_TOKENS:
            rollout["max_new_tokens"] = MAX_NEW_TOKENS
            self.note(f"rollout.max_new_tokens: {tokens} -> {MAX_NEW_TOKENS}")
        if self.spec.needs_rewards:
            self.did(f"generation with transformers: {rollout.get('num_generations', 8)} samples per prompt")

    # --- data ------------------------------------------------------------------------------------------

    def data(self) -> None:
        for section, source, fields in self.sources():
            replaced = self.data_source(section, source, fields)
            parent, key = section.split(".")
            self.raw[parent][key] = replaced
        if self.images and isinstance((self.raw.get("data") or {}).get("eval"), dict) and self.spec.eval_schema is None:
            self.raw["data"].pop("eval")  # image trainers evaluate with their suite

    def data_source(self, section: str, source: dict[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
        source = dict(source)
        if "synthetic" in source:
            n = source.get("n")
            if not isinstance(n, int) or n > 4 * ROWS:
                source["n"] = 4 * ROWS
                self.note(f"{section}: synthetic {source['synthetic']}, n = {n or 'default'} -> {4 * ROWS}")
            return source
        path = source.get("path")
        if self.is_local(source):
            source["path"] = str(Path(self.recipe.resolve_path(path)).resolve())
            limit = source.get("limit")
            source["limit"] = min(int(limit), ROWS) if isinstance(limit, int) else ROWS
            self.note(f"{section}: {path} (local): its first {source['limit']} rows")
            return source
        target = self.out.workdir / "data" / section.replace(".", "_")
        if fields is None:
            new = {"path": str(pickapic_rows(target.with_suffix(".parquet"), ROWS, self.rng)), "format": "pickapic"}
            what = "Pick-a-Pic rows (caption, jpg_0, jpg_1, label_0) of random 32 px images"
        else:
            new = {"path": str(write_rows(target.with_suffix(".jsonl"), text_rows(fields, ROWS, self.rng)))}
            what = f"rows ({', '.join(fields)})"
        kind = "not local (a hub dataset)" if "/" in str(path) and not str(path).startswith((".", "/")) and not Path(str(path)).suffix else "not there yet"  # fmt: skip
        self.note(f"{section}: {path} ({kind}) -> {ROWS} synthetic {what}")
        return new

    # --- rewards ---------------------------------------------------------------------------------------

    def rewards(self) -> None:
        for i, reward in enumerate(self.raw.get("rewards") or []):
            name, kwargs = reward.get("name"), reward.setdefault("kwargs", {})
            if name in MODEL_REWARDS and "model" in kwargs:
                target = self.out.workdir / "rewards" / f"{i}-{name}"
                built = stand_in_reward_model(target, name, self.recipe.resolve_path(str(kwargs["model"])))
                self.note(f"rewards[{i}] {name}: model {kwargs['model']} -> a tiny random {built} {name} model")
                kwargs["model"] = str(target)
                self.did(f"reward {name}: scoring with a reward model inside the training step")
            elif name == "remote":
                self.did(f"reward remote: the server at {kwargs.get('url')} (it must be up)")
            elif ":" in str(name):
                self.did(f"reward {name} (your code, as configured; synthetic rows carry only the schema's columns)")
            else:
                self.did(f"reward {name}")

    # --- evaluation ------------------------------------------------------------------------------------

    def evaluation(self) -> None:
        evaluation = self.raw.setdefault("eval", {})
        limit = evaluation.get("limit")
        evaluation["limit"] = min(int(limit), EVAL_ROWS) if isinstance(limit, int) else EVAL_ROWS
        if not self.images:
            tokens = evaluation.get("max_new_tokens")
            evaluation["max_new_tokens"] = min(int(tokens), MAX_NEW_TOKENS) if tokens else MAX_NEW_TOKENS
            if evaluation.get("every_steps") is not None:
                self.note(f"eval.every_steps: {evaluation['every_steps']} -> 1 (the in-training evaluation runs)")
                evaluation["every_steps"] = 1
        held_out = self.raw.get("data", {}).get("eval") or evaluation.get("data")
        if held_out is not None and not self.images:
            when = "before, during and after" if evaluation.get("every_steps") else "before and after"
            how = f" graded by {evaluation.get('grader', 'numeric_match')}" if self.spec.eval_schema == "prompt_answer" else ""  # fmt: skip
            self.did(f"held-out evaluation{how}, {when} training, on {evaluation['limit']} rows")
        suite = evaluation.get("suite")
        if suite:
            path = Path(self.recipe.resolve_path(str(suite)))
            evaluation["suite"] = str(self.rehearse_suite(path))
        self.did(f"checkpoint-1 written, every process stopped, --resume to step {STEPS}, final/ written and "
                 "evaluated")  # fmt: skip

    def rehearse_suite(self, path: Path) -> Path:
        """The suite with each benchmark cut to a few samples, its non-local data synthesised and its model-based
        image scorers replaced by the saturation scorer."""
        from posttrain.evaluation.suite import load_suite

        suite = load_suite(path)
        entries, scorers, synthesised = [], [], []
        for bench in suite.benchmarks:
            data = self.suite_data(bench)
            if data is not bench.data:
                synthesised.append(bench.name)
            entry = {"name": bench.name, "kind": bench.kind, "data": data, "limit": EVAL_ROWS}
            if bench.kind == "diffusion":
                entry["generation"] = {**bench.generation, "steps": 2, "batch_size": 2, "n": 1, "dtype": "fp32"}
                scorer = bench.scorer if isinstance(bench.scorer, str) else (bench.scorer or {}).get("name")
                entry["scorer"] = "saturation" if scorer in IMAGE_SCORERS_WITH_WEIGHTS else bench.scorer
                if scorer in IMAGE_SCORERS_WITH_WEIGHTS:
                    scorers.append(scorer)
            else:
                gen = dict(bench.generation)
                gen["max_new_tokens"] = min(int(gen.get("max_new_tokens", MAX_NEW_TOKENS)), MAX_NEW_TOKENS)
                prompt = dict(bench.prompt)
                if isinstance(prompt.get("few_shot_data"), dict):
                    shots = self.suite_source(f"{bench.name}_shots", prompt["few_shot_data"],
                                              ("prompt", "answer", "solution"))  # fmt: skip
                    if shots is not prompt["few_shot_data"]:
                        synthesised.append(f"{bench.name} (few-shot examples)")
                    prompt["few_shot_data"] = shots
                entry.update(prompt=prompt, generation=gen, grader=bench.grader, metrics=bench.metrics,
                             slice_column=bench.slice_column)  # fmt: skip
            for dropped in ("baseline", "reward_model"):
                if getattr(bench, dropped, None):
                    self.note(f"suite {suite.name}/{bench.name}: {dropped} {getattr(bench, dropped)} dropped")
            entries.append({k: v for k, v in entry.items() if v not in (None, [], {})})
        if synthesised:
            self.note(f"suite {suite.name}: data not local -> {ROWS} synthetic rows (text) or the colour prompts "
                      f"(images) for {', '.join(synthesised)}")  # fmt: skip
        if scorers:
            kinds = ", ".join(dict.fromkeys(scorers))
            self.note(f"suite {suite.name}: image scorers {kinds} -> saturation (analytic, no weights)")
            self.out.not_rehearsed.append(f"the image scorers {kinds}: their packages and weights (saturation stood in)")  # fmt: skip
        target = self.out.workdir / "suite.yaml"
        target.write_text(yaml.safe_dump({"name": suite.name, "version": suite.version, "benchmarks": entries},
                                         sort_keys=False))  # fmt: skip
        self.did(f"eval suite {suite.name}: {len(entries)} benchmarks, {EVAL_ROWS} samples each")
        return target

    def suite_data(self, bench: Any) -> dict[str, Any]:
        data = bench.data
        if bench.kind == "diffusion":
            if "prompts" in data or "shipped" in data or (data.get("path") and Path(data["path"]).exists()):
                return data
            return {"prompts": ["red", "green", "blue"], "repeat": 2}  # what the saturation scorer knows
        fields = {"preference": ("prompt", "chosen", "rejected"),
                  "polar": ("prompt", "reference", "chosen", "rejected")}.get(bench.kind, ("prompt", "answer", "solution"))  # fmt: skip
        if bench.slice_column:
            fields = (*fields, bench.slice_column)
        return self.suite_source(bench.name, data, fields)

    def suite_source(self, name: str, data: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
        if "synthetic" in data or (isinstance(data.get("path"), str) and Path(data["path"]).exists()):
            return data
        target = self.out.workdir / "data" / f"suite_{name}.jsonl"
        write_rows(target, text_rows(fields, ROWS, self.rng))
        return {"path": str(target)}


# ----------------------------------------------------------------------------------------------------- run


def run_rehearsal(rehearsal: Rehearsal, echo: Callable[[str], None] = print, timeout: float = 1800) -> Rehearsal:
    """Launch the rehearsal twice (stop after checkpoint-1, then --resume) and check the run dir after each; a
    failed launch raises RehearsalFailed with the tail of its log."""
    from posttrain.models.processes import STOP_AFTER_CHECKPOINT_ENV
    from posttrain.runs import RunDir

    run = RunDir(rehearsal.run_dir)
    first = _launch(rehearsal, 1, [], {STOP_AFTER_CHECKPOINT_ENV: "1"}, echo, timeout)
    state = run.state(STEPS)
    if state.kind != "interrupted" or state.checkpoint is None or state.checkpoint.name != "checkpoint-1":
        raise RehearsalFailed(
            f"launch 1 was to stop after checkpoint-1, but the run dir holds a {state.kind} run "
            f"(checkpoint: {state.checkpoint}); log: {first}"
        )
    second = _launch(rehearsal, 2, ["--resume"], {}, echo, timeout)
    state = run.state(STEPS)
    if state.kind != "finished" or state.final_step != STEPS:
        raise RehearsalFailed(
            f"launch 2 (--resume) left a {state.kind} run (final step {state.final_step}); log: {second}"
        )
    if not loadable_model_dir(run.final):
        raise RehearsalFailed(f"final/ holds no model a from_pretrained can load (no config and weights): {run.final}")
    losses = training_losses(run)
    repeated = sorted(step for step, values in losses.items() if len(values) > 1)
    if repeated:
        raise RehearsalFailed(f"--resume trained step(s) {repeated} again instead of continuing from checkpoint-1; log: {second}")  # fmt: skip
    if losses and all(v == 0 for values in losses.values() for v in values):
        rehearsal.not_rehearsed.append(
            "a non-zero loss: it was 0 at every step (a random stand-in earns no reward variance, so every group was "
            "uninformative); the loss and its backward pass ran, the learning signal did not"
        )
    return rehearsal


def _launch(rehearsal: Rehearsal, n: int, extra: list[str], env_extra: dict[str, str], echo: Callable[[str], None],
            timeout: float) -> Path:  # fmt: skip
    import posttrain

    log = rehearsal.workdir / f"launch-{n}.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(rehearsal.accelerate_config),
           "--main_process_port", str(port), "-m", "posttrain", "train", str(rehearsal.recipe_path), *extra]  # fmt: skip
    root = str(Path(posttrain.__file__).resolve().parents[1])  # the posttrain this process runs, in every rank
    # On the CPU also on a GPU machine: no CUDA device visible, DeepSpeed's CPU accelerator.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu", **env_extra}  # fmt: skip
    what = "train to checkpoint-1, then stop" if not extra else f"--resume to step {STEPS}"
    echo(f"launch {n}/2: {what} (log: {log})")
    start = time.monotonic()
    with log.open("w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RehearsalFailed(f"launch {n} ran past {timeout:.0f} s; log: {log}\n{_tail(log)}") from None
    if proc.returncode != 0:
        raise RehearsalFailed(f"launch {n} failed (exit {proc.returncode}); log: {log}\n{_tail(log)}")
    echo(f"launch {n}/2 done in {time.monotonic() - start:.0f} s")
    return log


def _tail(log: Path, lines: int = 40) -> str:
    """The error a launch died of: posttrain's own error line (`XError: ...` and what follows it) or a worker's
    Python traceback; else a worker's native crash lines (`terminate called ...`) and the log's last lines (the
    launcher's own traceback and summary say only which rank failed)."""
    text = log.read_text(errors="replace").splitlines()
    launcher = ("accelerate/commands/launch.py", "torch/distributed/run.py", "torch/distributed/launcher")
    for i, line in enumerate(text):
        line = re.sub(r"^\[rank\d+\]:\s*", "", line)
        block = text[i : i + lines]
        if re.match(r"^\w+(Error|Exception): ", line):
            return "\n".join(block)
        if line.startswith("Traceback (most recent call last)") and not any(
            m in b for b in block[:4] for m in launcher
        ):
            return "\n".join(block)
    crash = [line for line in text if re.search(r"terminate called|what\(\):|Signal \d+|exitcode\s*:", line)]
    return "\n".join([*crash, "...", *text[-lines // 2 :]])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
