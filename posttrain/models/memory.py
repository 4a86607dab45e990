"""The memory plan of a recipe, per device, before any GPU time is spent ("how much memory do I need / why OOM").

Terms, each marked exact or estimate:
- model states, exact given the parameter count: weights, gradients and AdamW states, with DeepSpeed's accounting
  per ZeRO stage (the one its `estimate_zero2/3_model_states_mem_needs` use: 16-bit weights and gradients, fp32
  master weights, momentum, variance and gradient partitions = 16 bytes per trainable parameter, sharded over the
  processes from stage 1 on; gradients from stage 2; weights from stage 3, plus the largest layer gathered);
  under FSDP2 (accelerate's `fsdp_version: 2`) weights, gradients and AdamW states all sharded over the processes,
  fp32 master weights under mixed precision, plus the units gathered for compute (`fsdp2_terms`); without
  either, weights, gradients and both AdamW states in the training dtype; LoRA trains only the adapters;
- the reference model (KL with `beta > 0`, full fine-tuning only: LoRA's reference is the base with adapters off),
  sharded where the launch shards the policy's weights (ZeRO-3, FSDP2: TRL prepares it the same way);
- a frozen teacher (a trainer whose spec names a `teacher_option`): its weights, from its own config.json, in the
  policy's dtype;
- vLLM's share of the device when it is colocated (`gpu_memory_utilization`, exact: vLLM reserves it);
- estimates: the logits of the log-prob pass (batch x completion tokens x vocabulary, 16-bit logits plus the fp32
  log-softmax; often the largest term in GRPO) and the activations kept for backward (per layer about
  2 bytes x batch x tokens x (7h + 2 h_kv + 4 I) with SDPA/flash attention; with gradient checkpointing only each
  layer's input plus one layer recomputed).

The model's shape comes from a local `config.json`, the hub cache, or `KNOWN_SHAPES` (the hub models the shipped
recipes name, copied from their config.json), so `--dry-run` works offline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only transformer (Llama/Qwen2/InternLM2 layout)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    family: str = "llama"  # config.json's model_type (what `--rehearse` builds a tiny model of)

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def layer_params(self) -> int:
        """One decoder layer (attention with its biases, the MLP, two norms): a unit of FSDP2's transformer-based
        wrapping."""
        h, kv = self.hidden, self.kv_hidden
        attention = 2 * h * h + 2 * h * kv + (h + 2 * kv if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def output_unit_params(self) -> int:
        """The output head and the final norm (tied, the embedding is the head's own tensor): the unit accelerate's
        FSDP2 keeps gathered from forward to backward."""
        return self.vocab * self.hidden + self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The biggest single module (DeepSpeed ZeRO-3 gathers one at a time): the embedding, for these models."""
        h = self.hidden
        return max(self.vocab * h, 3 * h * self.intermediate)

    @property
    def kv_hidden(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
            family=str(config.get("model_type") or "llama"),
        )


_QWEN25_15B = ModelShape(1536, 28, 12, 2, 8960, 151936, tied=True, qkv_bias=True, family="qwen2")
_QWEN25_7B = ModelShape(3584, 28, 28, 4, 18944, 152064, tied=False, qkv_bias=True, family="qwen2")
# From each model's config.json on the hub (hidden, layers, heads, kv heads, intermediate, vocab, tied).
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-Math-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_15B,
    "Qwen/Qwen2.5-Math-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "internlm/POLAR-1_8B": ModelShape(2048, 24, 16, 8, 8192, 92544, family="internlm2"),
    "internlm/POLAR-7B": ModelShape(4096, 32, 32, 8, 14336, 92544, family="internlm2"),
}


def model_shape(source: str) -> ModelShape | None:
    """The shape of a model dir or hub id: its config.json (local, or in the hub cache), else KNOWN_SHAPES."""
    path = Path(source) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # not a valid repo id, no cache: fall through to the table
            pass
    if path.is_file():
        try:
            return ModelShape.from_config(json.loads(path.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError):
            return None
    return KNOWN_SHAPES.get(source)


@dataclass(frozen=True)
class Launch:
    """The parts of an accelerate config the plan needs, and what each launch kind shards over its processes (the
    one place that knows it: the plan, the reference model's and the teacher's share, the dry-run's label)."""

    processes: int = 1
    zero_stage: int | None = None  # None: no DeepSpeed (DDP, FSDP or one process)
    fsdp_version: int | None = None  # accelerate's FSDP (`distributed_type: FSDP`); None: not FSDP
    reshard_after_forward: bool = True  # FSDP2: a unit's gathered weights are freed after its forward
    mixed_precision: str = "no"  # the config's; a recipe's `training.precision` bf16/fp16 turns it on too
    offload_optimizer: bool = False
    offload_params: bool = False  # under FSDP2 the sharded weights, gradients and optimizer step all go to the CPU
    source: str = "one process, no DeepSpeed"

    @property
    def fsdp2(self) -> bool:
        return self.fsdp_version == 2

    @property
    def shards_weights(self) -> bool:
        """Each process holds 1/N of the weights (ZeRO-3, FSDP2), and of a frozen reference model or teacher, which
        TRL and accelerate prepare the same way as the policy."""
        return self.zero_stage == 3 or self.fsdp2

    @property
    def sharded(self) -> bool:
        """The model is wrapped by a sharding engine (DeepSpeed ZeRO, FSDP), which a trainer must be built for
        (`TrainerSpec.deepspeed`)."""
        return self.zero_stage is not None or self.fsdp_version is not None

    @property
    def engine(self) -> str:
        """'DeepSpeed ZeRO-<stage>', 'FSDP<version>' or 'DDP'."""
        if self.zero_stage is not None:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return f"FSDP{self.fsdp_version}" if self.fsdp_version is not None else "DDP"

    @property
    def kind(self) -> str:
        """'ZeRO-<stage>', 'FSDP2', 'FSDP1 (counted unsharded)' or 'no DeepSpeed' (DDP or one process)."""
        if self.zero_stage is not None:
            return f"ZeRO-{self.zero_stage}"
        if self.fsdp_version is not None:
            return "FSDP2" if self.fsdp2 else f"FSDP{self.fsdp_version} (counted unsharded)"
        return "no DeepSpeed"


def read_launch(path: str | Path | None) -> Launch:
    if path is None:
        return Launch()
    data = yaml.safe_load(Path(path).read_text()) or {}
    ds = data.get("deepspeed_config") or {}
    stage = ds.get("zero_stage") if data.get("distributed_type") == "DEEPSPEED" else None
    fsdp = (data.get("fsdp_config") or {}) if data.get("distributed_type") == "FSDP" else None
    offload_fsdp = fsdp is not None and _flag(fsdp.get("fsdp_offload_params", False))
    return Launch(
        processes=int(data.get("num_processes", 1)),  # accelerate's num_processes counts every machine's
        zero_stage=None if stage is None else int(stage),
        # accelerate's defaults when the key is absent: version 1, resharding after forward
        fsdp_version=None if fsdp is None else int(fsdp.get("fsdp_version", 1)),
        reshard_after_forward=_flag((fsdp or {}).get("fsdp_reshard_after_forward", True)),
        mixed_precision=str(data.get("mixed_precision") or "no"),
        offload_optimizer=ds.get("offload_optimizer_device", "none") not in ("none", None) or offload_fsdp,
        offload_params=ds.get("offload_param_device", "none") not in ("none", None) or offload_fsdp,
        source=str(path),
    )


def _flag(value: Any) -> bool:
    """An accelerate config's boolean as YAML or its env vars spell it (true, "true", "True"); FSDP1's sharding
    strategies read as whether they reshard after forward (FULL_SHARD, HYBRID_SHARD)."""
    return str(value).strip().lower() in ("true", "1", "yes", "full_shard", "hybrid_shard")


# The launch a plan is made for when it is not this process's own: `posttrain launch --nodes N --gpus-per-node G`
# plans (and checks the batch of) a job of N x G processes from a process that is not part of it.
_PLANNED_LAUNCH: ContextVar[Launch | None] = ContextVar("planned_launch", default=None)


@contextmanager
def planning_for(launch: Launch) -> Iterator[Launch]:
    """Within the block, plans and batch checks count `launch` (`planned_launch`) instead of the recipe's config."""
    token = _PLANNED_LAUNCH.set(launch)
    try:
        yield launch
    finally:
        _PLANNED_LAUNCH.reset(token)


def planned_launch() -> Launch | None:
    """The launch set by an enclosing `planning_for`, else None."""
    return _PLANNED_LAUNCH.get()


def launch_of_this_process() -> Launch | None:
    """The launch this process runs under, from the environment `accelerate launch` sets; None outside one."""
    import os

    if "WORLD_SIZE" not in os.environ:
        return None
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    offload_fsdp = fsdp and _flag(os.environ.get("FSDP_OFFLOAD_PARAMS", "false"))
    return Launch(
        processes=int(os.environ["WORLD_SIZE"]),
        zero_stage=int(stage) if deepspeed and stage else None,
        fsdp_version=int(os.environ.get("FSDP_VERSION", "1")) if fsdp else None,
        reshard_after_forward=_flag(os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")),
        mixed_precision=os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
        offload_optimizer=offload_fsdp,
        offload_params=offload_fsdp,
        source="this accelerate launch",
    )


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '141 GiB', '24g' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
    if not match:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB)")
    power = " kmgt".index(match.group(2).lower() or " ")
    base = 1024 if (match.group(3) or "ib").lower() == "ib" else 1000
    return int(float(match.group(1)) * base**power)


@dataclass
class Term:
    name: str
    bytes: float
    exact: bool
    note: str = ""


@dataclass
class MemoryPlan:
    terms: list[Term] = field(default_factory=list)
    device_bytes: int = 80 * GIB
    launch: Launch = field(default_factory=Launch)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    def lines(self) -> list[str]:
        out = [
            f"memory plan per device ({self.launch.processes} process(es), {self.launch.kind}, from {self.launch.source}; "
            f"device {self.device_bytes / GIB:.0f} GiB assumed, --gpu-memory to change):"
        ]
        for t in self.terms:
            kind = "exact" if t.exact else "estimate"
            out.append(f"  {t.name:<38s} {t.bytes / GIB:8.2f} GiB  {kind}{'; ' + t.note if t.note else ''}")
        verdict = "fits" if self.total <= self.device_bytes else "DOES NOT FIT"
        out.append(f"  {'total':<38s} {self.total / GIB:8.2f} GiB  {verdict}")
        if self.total > self.device_bytes:
            out.append("  " + self.advice())
        return out

    def advice(self) -> str:
        biggest = max(self.terms, key=lambda t: t.bytes)
        knobs = {
            "logits": "lower training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
            "batch) or rollout.max_new_tokens",
            "activations": "model.gradient_checkpointing: true, or a smaller per_device_train_batch_size",
            "optimizer": "a higher ZeRO stage or more processes (states shard over them), or model.lora",
            "gradients": "ZeRO-2/3 (gradients shard over the processes), or model.lora",
            "weights": "ZeRO-3 or FSDP2 (weights shard over the processes), or model.lora with a 16-bit base",
            "gathered": "fsdp_reshard_after_forward: true (each layer is freed after its forward), or model.lora",
            "reference": "algorithm.beta: 0 (no reference model) or model.lora (the base is the reference)",
            "teacher": "a smaller teacher, a 16-bit model.dtype, or ZeRO-3/FSDP2 (the teacher shards over the "
            "processes)",
            "vllm": "a lower rollout.vllm.gpu_memory_utilization or vllm mode: server on other GPUs",
        }
        knob = next((v for k, v in knobs.items() if biggest.name.startswith(k)), "a smaller batch")
        return f"the largest term is {biggest.name} ({biggest.bytes / GIB:.1f} GiB): {knob}"


def lora_params(shape: ModelShape, r: int) -> int:
    """Adapter parameters of `all-linear` LoRA: r x (in + out) for each of the 7 projections of every layer."""
    h, kv, inter = shape.hidden, shape.kv_hidden, shape.intermediate
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 3)
    return shape.layers * per_layer


def model_state_terms(
    params: int,
    trainable: int,
    weight_bytes: int,
    launch: Launch,
    largest_layer: int = 0,
    *,
    mixed_precision: bool = False,
    layer: int = 0,
    output_unit: int = 0,
) -> list[Term]:
    """Weights, gradients and optimizer states per device. Under DeepSpeed, the accounting of its own
    `estimate_zero2_model_states_mem_needs` (stage 2: full 16-bit weights, the process's partition of the 16-bit
    gradients, and 16 bytes of fp32 master weight, momentum, variance and gradient per trainable parameter sharded
    over the processes: 2P + 18P/N, DeepSpeed 0.19; stage 1 keeps the gradients whole) and
    `estimate_zero3_model_states_mem_needs` (weights sharded too, plus the largest layer's weights and gradients
    gathered) plus ZeRO-3's gradient partition buffer, which that estimator omits and DeepSpeed holds (measured:
    scripts/zero_state_bytes.py); generalised to LoRA, where only the adapters have gradients and optimizer states.
    Under FSDP2, `fsdp2_terms` (`mixed_precision`, `layer`, `output_unit` are its)."""
    n, stage, w = launch.processes, launch.zero_stage, weight_bytes
    if launch.fsdp2:
        return fsdp2_terms(params, trainable, w, launch, mixed_precision, layer, output_unit)
    if stage is None:
        return [
            Term("weights", params * w, True),
            Term("gradients", trainable * w, True),
            Term("optimizer (AdamW m, v)", 2 * trainable * w, True),
        ]
    bits = f"{8 * w}-bit"
    optimizer = Term("optimizer (fp32 master, m, v, grads)", 0.0 if launch.offload_optimizer else 16 * trainable / n,
                     True, "offloaded to CPU" if launch.offload_optimizer else f"sharded over {n}")  # fmt: skip
    if stage < 3:
        # ZeRO-2 reduce-scatters the gradients, so each process keeps its partition; ZeRO-1 keeps them whole.
        gradients = 0.0 if launch.offload_optimizer else trainable * w / (n if stage == 2 else 1)
        where = "offloaded to CPU" if launch.offload_optimizer else (f"sharded over {n}" if stage == 2 else "")
        return [Term(f"weights ({bits})", params * w, True), Term(f"gradients ({bits})", gradients, True, where),
                optimizer]  # fmt: skip
    weights = 0.0 if launch.offload_params or launch.offload_optimizer and launch.offload_params else params * w / n
    # ZeRO-3 also keeps a persistent flat buffer for its partition of the gradients (in the model's dtype), which
    # DeepSpeed's estimator leaves out; measured in a CPU run (scripts/zero_state_bytes.py, docs/performance.md).
    gradients = 0.0 if launch.offload_optimizer else trainable * w / n
    return [
        Term(f"weights ({bits})", weights, True, "offloaded" if launch.offload_params else f"sharded over {n}"),
        Term(
            f"gradients ({bits})",
            gradients,
            True,
            "offloaded to CPU" if launch.offload_optimizer else f"sharded over {n}",
        ),  # fmt: skip
        Term("largest layer, gathered", 2 * w * largest_layer, True, "its weights and gradients"),
        optimizer,
    ]


def fsdp2_terms(
    params: int, trainable: int, weight_bytes: int, launch: Launch, mixed_precision: bool, layer: int, output_unit: int
) -> list[Term]:
    """FSDP2 (torch's `fully_shard` as accelerate 1.15 applies it, `fsdp2_prepare_model`) per process.

    Sharded over the N processes (dim 0 of every tensor): the weights, their gradients and both AdamW states. Under
    mixed precision accelerate first upcasts the trainable weights to fp32 (master weights; their gradients and the
    AdamW states follow that dtype: 4 + 4 + 8 = 16 bytes per trainable parameter over N, where ZeRO-3 holds 20: its
    16-bit copies too) and gathers and computes in 16 bit; without it all of them stay in the model's dtype. Frozen
    weights (LoRA's base) stay in the model's dtype. With `fsdp_offload_params` the shards and the optimizer step are
    on the CPU.

    Gathered for compute (an estimate: how far torch prefetches is its own runtime policy): the units are each
    decoder layer (TRANSFORMER_BASED_WRAP) and the output head with the final norm (tied, the embedding is the same
    tensor; untied, the embedding is a unit of its own, no larger than the head), which accelerate keeps gathered
    from forward to backward. With `reshard_after_forward` a layer is gathered for its forward, freed, and gathered
    again for its backward, the next one prefetched meanwhile: the output unit and two layers at once, plus the
    unsharded 16-bit gradients of the output unit and one layer before their reduce-scatter (full fine-tuning; LoRA's
    adapter gradients are negligible). Without it every unit stays gathered from forward to backward: the whole model
    in the compute dtype."""
    n = launch.processes
    master = 4 if mixed_precision else weight_bytes
    compute = 2 if mixed_precision else weight_bytes
    held = 0.0 if launch.offload_params else 1.0
    where = "offloaded to CPU" if launch.offload_params else f"sharded over {n}"
    name = "fp32 master" if mixed_precision else f"{8 * weight_bytes}-bit"
    gathered = output_unit + 2 * layer if launch.reshard_after_forward else params
    how = "the output unit and two layers" if launch.reshard_after_forward else "every unit, until backward"
    unsharded_grads = compute * (output_unit + layer) if trainable == params else 0.0
    return [
        Term(f"weights ({name})", held * (master * trainable + weight_bytes * (params - trainable)) / n, True, where),
        Term(f"gradients ({8 * master}-bit)", held * master * trainable / n, True, where),
        Term("optimizer (AdamW m, v)", held * 2 * master * trainable / n, True, where),
        Term(f"gathered weights ({8 * compute}-bit)", compute * gathered, False, how),
        Term(f"gathered gradients ({8 * compute}-bit)", unsharded_grads, False, "output unit and one layer"),
    ]


def plan_for(recipe: Any, spec: Any, launch: Launch, device_bytes: int, shape: ModelShape | None) -> MemoryPlan | None:
    """The plan of a causal-LM or reward-model recipe (None when the model's shape is unknown, e.g. a diffusion model).

    What the method holds and computes comes from its trainer's declaration (`spec`, a `registry.TrainerSpec`:
    rollouts or not, sequences per row, a reference model, the length setting, token logits or one score), the
    batch and lengths from the validated recipe's `settings` (the library's defaults under the recipe's values)."""
    if shape is None:
        return None
    s, r = recipe.settings, recipe.rollout
    mixed = s.get("precision") in ("bf16", "fp16") or launch.mixed_precision in ("bf16", "fp16")
    weight_bytes = 2 if (recipe.model.dtype in ("bfloat16", "float16") or s.get("precision") in ("bf16", "fp16")) else 4
    lora = recipe.model.lora
    trainable = lora_params(shape, lora.r) if lora else shape.params
    plan = MemoryPlan(device_bytes=device_bytes, launch=launch)
    plan.terms += model_state_terms(shape.params, trainable, weight_bytes, launch, shape.largest_layer_params,
                                    mixed_precision=mixed, layer=shape.layer_params,
                                    output_unit=shape.output_unit_params)  # fmt: skip
    if spec.reference_model and (s.get("beta") or 0) > 0 and not lora:
        share = launch.processes if launch.shards_weights else 1
        plan.terms.append(Term("reference model", shape.params * weight_bytes / share, True, "beta > 0"))
    plan.terms += teacher_terms(recipe, spec, weight_bytes, launch)
    plan.terms += reward_model_terms(recipe)
    if r.backend == "vllm" and r.vllm.mode == "colocate":
        plan.terms.append(Term("vllm (colocated)", r.vllm.gpu_memory_utilization * device_bytes, True,
                               "rollout.vllm.gpu_memory_utilization"))  # fmt: skip
    plan.terms += activation_terms(recipe, spec, shape)
    return plan


def teacher_terms(recipe: Any, spec: Any, weight_bytes: int, launch: Launch) -> list[Term]:
    """The frozen teacher the trainer declares (`spec.teacher_option`, the options field holding its path or hub
    id): its weights in the policy's dtype, sharded over the processes under ZeRO-3 and FSDP2 as the reference model
    is."""
    if not spec.teacher_option or recipe.options is None or not getattr(recipe.options, spec.teacher_option):
        return []
    source = getattr(recipe.options, spec.teacher_option)
    shape = model_shape(recipe.resolve_path(source))
    if shape is None:
        return [Term("teacher model", 0.0, False, f"not counted: the shape of '{source}' is unknown here")]
    share = launch.processes if launch.shards_weights else 1
    return [Term("teacher model", shape.params * weight_bytes / share, True, f"frozen, {source}")]


def reward_model_terms(recipe: Any) -> list[Term]:
    """The reward models a recipe's rewards load (each reward declares the option naming its model), 16-bit."""
    from reward_models import reward_info

    terms = []
    for reward in recipe.rewards:
        source = reward_info(reward.name).model(reward.kwargs)
        judge = model_shape(source) if source else None
        if judge is not None:
            terms.append(Term(f"reward model {reward.name} (16-bit)", judge.params * 2, True, "inference only"))
    return terms


def activation_terms(recipe: Any, spec: Any, shape: ModelShape) -> list[Term]:
    """The logits of the log-prob pass (token-logit models only) and the activations kept for backward."""
    s, r = recipe.settings, recipe.rollout
    batch = int(s.per_device_train_batch_size)
    rows = batch * spec.sequences_per_row
    if spec.generates:
        # No prompt-length setting in TRL's GRPO-family configs: data.max_prompt_length bounds them, else 512 assumed.
        tokens = int(s.get("max_prompt_length") or recipe.data.max_prompt_length or 512) + r.max_new_tokens
        logit_tokens = r.max_new_tokens
    else:
        tokens = int((s.get(spec.length_key) if spec.length_key else None) or 1024)
        logit_tokens = tokens
    terms = []
    if spec.model == "causal_lm":
        # 16-bit logits and their gradient for the batch, plus one row's fp32 log-softmax at a time (TRL's
        # selective_log_softmax loops over rows for 16-bit logits).
        logits = rows * logit_tokens * shape.vocab * 2 * 2 + logit_tokens * shape.vocab * 4
        terms.append(Term("logits (log-prob pass)", logits, False,
                          f"{rows} x {logit_tokens} tokens x {shape.vocab} vocab, 16-bit, and their gradient"))  # fmt: skip
    per_layer = 2 * rows * tokens * (7 * shape.hidden + 2 * shape.kv_hidden + 4 * shape.intermediate)
    if recipe.model.gradient_checkpointing:
        kept = 2 * rows * tokens * shape.hidden * shape.layers + per_layer
        terms.append(Term("activations (checkpointed)", kept, False, f"{tokens} tokens per row"))
    else:
        terms.append(Term("activations", per_layer * shape.layers, False, f"{tokens} tokens per row"))
    return terms
