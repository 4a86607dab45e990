"""Prepare a rehearsal: the recipe rewritten section by section (tiny models, shrunk batch and steps, synthetic data,
stand-in rewards, a cut eval suite), each substitution noted."""

from __future__ import annotations

import copy
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from posttrain.data.stand_ins import pickapic_rows, text_rows, write_rows
from posttrain.models.stand_ins import model_family, stand_in_reward_model
from posttrain.recipe import Recipe
from posttrain.rehearsal_edit import RehearsalEdit
from posttrain.rehearse.common import EVAL_ROWS, MAX_NEW_TOKENS, ROWS, STEPS, Rehearsal, RehearsalError
from posttrain.rehearse.launch import write_launch_config
from posttrain.rehearse.suite import rehearse_suite

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
    data = _DataStandIns(recipe, spec, raw, rehearsal)
    data.check_data()  # refuse what cannot be synthesised before any model is built
    builder = _Builder(recipe, spec, raw, rehearsal)
    write_launch_config(recipe, accelerate_config, rehearsal)
    raw["accelerate_config"] = str(rehearsal.accelerate_config)
    builder.model()
    builder.training()
    data.rewrite()
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
        self.images = spec.model == "diffusion"  # a trainer that reads images, not text rows
        self.rng = random.Random(recipe.seed)

        self.note, self.did = rehearsal.note, rehearsal.did

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
            from posttrain.rollout.tools import wanted

            source = self.recipe.resolve_path(section.path or "")
            family, how = model_family(source)
            tools = wanted(self.recipe)  # the stand-in's template must render and parse tool calls
            path, built = save_family_model(self.out.workdir / "model", family, seed=self.recipe.seed, tools=tools)
            fallback = f"; {family} is not a transformers class: llama stands in" if built != family else ""
            self.note(f"model: {source} -> a tiny random {built} model (2 layers, hidden 64; family {how}{fallback})")
            if tools:
                self.note("model: the stand-in's chat template is posttrain's tiny tool-calling one, not the model's")
            model["path"] = str(path)
            if model.pop("trust_remote_code", False):
                self.note("model.trust_remote_code: true -> false (the stand-in is a transformers class)")
        if self.recipe.model.dtype not in ("auto", "float32"):
            self.note(f"model.dtype: {self.recipe.model.dtype} -> float32 (the CPU trains in fp32)")
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
        """Precision to fp32, then the trainer's own `rehearse(edit)` hook shapes batch and steps (the default: at
        most 2 rows x 2 micro-batches, `STEPS` optimizer steps); long sequences capped; rollouts on transformers."""
        from posttrain.registry import trainer_module

        training = self.raw.setdefault("training", {})
        if self.recipe.settings.precision not in ("auto", "fp32"):
            self.note(f"training.precision: {self.recipe.settings.precision} -> fp32 (CPU)")
            training["precision"] = "fp32"
        self.trackers(training)
        edit = RehearsalEdit(self.recipe, self.raw, STEPS, self.note, self.did, workdir=self.out.workdir)
        hook = getattr(trainer_module(self.spec.name), "rehearse", None)
        if hook is not None:
            hook(edit)
        else:
            edit.shrink_batch()
            edit.train_steps()
        if self.spec.reference_model and (self.recipe.settings.get("beta") or 0) > 0:
            self.did(f"a reference model (beta = {self.recipe.settings.beta:g})")
        edit.cap("algorithm", "max_length", 1024)
        edit.cap("algorithm", "max_response_length", 256)
        if self.raw.get("rollout") is not None or self.spec.generates:
            self.rollout(self.raw.setdefault("rollout", {}))

    def trackers(self, training: dict[str, Any]) -> None:
        """report_to trackers log for real where installed; one whose package is not installed here is left out."""
        from posttrain.preflight import missing_trackers, trackers_named

        named = trackers_named(self.recipe.training.get("report_to"))
        missing = missing_trackers(named)
        kept = [name for name in named if name not in missing]
        if missing:
            training["report_to"] = kept or "none"
            listed, now = ", ".join(missing), ", ".join(kept) or "none"
            self.note(f"training.report_to: {', '.join(named)} -> {now} (not installed here: {listed})")
            self.out.not_rehearsed.append(f"logging to {listed} (pip install 'posttrain[{','.join(missing)}]')")
        if kept:
            self.did(f"logging to {', '.join(kept)}")

    def rollout(self, rollout: dict[str, Any]) -> None:
        if rollout.get("backend") == "vllm":
            rollout["backend"] = "hf"
            mode = self.recipe.rollout.vllm.mode
            self.note("rollout.backend: vllm -> hf (transformers generate)")
            self.out.not_rehearsed.append(
                f"vLLM rollouts ({mode} mode): vLLM needs a CUDA GPU; they run for the first time on the GPU"
            )
        tokens = self.recipe.rollout.max_new_tokens
        if tokens > MAX_NEW_TOKENS:
            rollout["max_new_tokens"] = MAX_NEW_TOKENS
            self.note(f"rollout.max_new_tokens: {tokens} -> {MAX_NEW_TOKENS}")
        if self.spec.generates:
            from posttrain.registry import library_field_types

            # Groups of samples only where the trainer's library config takes a group size (distillation: one each).
            config = self.spec.library_config
            grouped = config is None or "num_generations" in library_field_types(config)
            n = rollout.get("num_generations", self.recipe.rollout.num_generations) if grouped else 1
            self.did(f"generation with transformers: {n} sample{'s' if n != 1 else ''} per prompt")
        from posttrain.rollout.tools import tools_plan, wanted

        if wanted(self.recipe):
            self.did(f"the tool loop: {tools_plan(self.recipe)}")

    # --- rewards ---------------------------------------------------------------------------------------

    def rewards(self) -> None:
        """Rewards that load a model (as each declares, `reward_models.reward_info`) score with a tiny stand-in."""
        from reward_models import reward_info

        for i, reward in enumerate(self.raw.get("rewards") or []):
            name, kwargs = reward.get("name"), reward.setdefault("kwargs", {})
            info = reward_info(str(name))
            if info.model_option and info.model_option in kwargs:
                target = self.out.workdir / "rewards" / f"{i}-{str(name).replace(':', '-')}"
                source = self.recipe.resolve_path(str(kwargs[info.model_option]))
                built = stand_in_reward_model(target, source, info.stand_in)
                self.note(f"rewards[{i}] {name}: {info.model_option} {kwargs[info.model_option]} -> a tiny random "
                          f"{built} {name} model")  # fmt: skip
                kwargs[info.model_option] = str(target)
                self.did(f"reward {name}: scoring with a reward model inside the training step")
            elif info.service_option:
                self.did(f"reward {name}: the server at {kwargs.get(info.service_option)} (it must be up)")
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
            evaluation["suite"] = str(rehearse_suite(path, self.out, self.rng))
        self.did(f"checkpoint-1 written, every process stopped, --resume to step {STEPS}, final/ written and "
                 "evaluated")  # fmt: skip


class _DataStandIns:
    """The recipe's data sources in the rehearsal: synthetic sources made small, local ones cut to their first rows,
    the others (hub datasets, files an earlier step writes) replaced by synthetic rows of the fields the trainer and
    its rewards read; a schema that cannot be synthesised is refused before anything is built."""

    def __init__(self, recipe: Recipe, spec: Any, raw: dict[str, Any], rehearsal: Rehearsal):
        self.recipe, self.spec, self.raw, self.out = recipe, spec, raw, rehearsal
        self.images = spec.model == "diffusion"
        self.rng = random.Random(recipe.seed)
        self.note = rehearsal.note

    def sources(self) -> list[tuple[str, dict[str, Any], tuple[str, ...] | None]]:
        """(section, source, fields a synthetic stand-in needs) of each data source the recipe names."""
        from posttrain.data.schemas import SCHEMAS
        from reward_models import reward_columns

        found = []
        data = self.raw.get("data") or {}
        train = data.get("train")
        if isinstance(train, dict | list):
            if self.images:
                fields = None
            else:
                read = [c for r in self.recipe.rewards for c in reward_columns(r.name, r.kwargs)]
                fields = tuple(dict.fromkeys((*SCHEMAS[self.spec.train_schema], *read)))
            if isinstance(train, dict):
                found.append(("data.train", train, fields))
            else:  # a mixture: each of its sources (rewrite() replaces them in the list)
                found += [
                    (f"data.train.{i}", entry, fields) for i, entry in enumerate(train) if isinstance(entry, dict)
                ]
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

    def rewrite(self) -> None:
        for section, source, fields in self.sources():
            replaced = self.data_source(section, source, fields)
            parent, key, *index = section.split(".")
            if index:  # data.train.<i>: a mixture's source, its weight kept
                replaced.setdefault("weight", source.get("weight", 1))
                self.raw[parent][key][int(index[0])] = replaced
            else:
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
