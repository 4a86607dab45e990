"""Held-out evaluation through a GRPO-family trainer's own vLLM engine (`rollout.backend: vllm`).

Without it the in-training eval generated with transformers' `generate`, which on a 7B model with 1,319 GSM8K
prompts x 512 tokens costs more than the training steps between evals. TRL 1.16 holds the engine in
`trainer.vllm_generation` (`trl.generation.vllm_generation.VLLMGeneration`) and pushes the current weights to it
with `sync_weights()` before it generates, when the step changed (`trainer._last_loaded_step`); the eval does the
same, then:

- colocate: each process's own engine (`vllm_generation.llm`, a `vllm.LLM`) generates its shard of the prompts
  (`ShardedGenerator`; with tensor parallelism, one shard per tensor-parallel group, whose ranks send the same
  prompts as TRL's own generation requires);
- server: the main process sends every prompt to the server (`vllm_generation.vllm_client.generate`, TRL's client
  of `trl vllm-serve`), decodes the returned token ids and broadcasts the texts to the other processes.

Every process calls `generate_samples` (weight sync is collective under ZeRO-3 and the shards are gathered).
The TRL internals read here are guarded by tests/test_rollout_vllm.py.
"""

from __future__ import annotations

from typing import Any

from posttrain.rollout import Sample, SamplingParams


def held_out_generator(model: Any, tokenizer: Any, batch_size: int, trainer: Any = None) -> Any:
    """What held-out evaluation generates with: the trainer's own vLLM engine when it rolls out with vLLM (synced to
    the weights being trained), else transformers' `generate` on the policy; either way every rank generates 1/N
    of each benchmark (gathered in order)."""
    if trainer is not None and trainer_engine(trainer) is not None:
        generator: Any = TrainerVLLMGenerator(trainer, tokenizer)
    else:
        from posttrain.rollout.hf import HFGenerator
        from posttrain.rollout.sharded import ShardedGenerator

        generator = ShardedGenerator(HFGenerator(model, tokenizer, batch_size))
    tools, rounds, environments = getattr(trainer, "eval_tools", None) or ([], None, {})  # trainers.base.run_training
    if tools or environments:  # a tool recipe: evaluate with the tool loop (posttrain.rollout.tool_loop)
        from posttrain.rollout.tool_loop import ToolLoopGenerator

        generator = ToolLoopGenerator(generator, tokenizer, tools, rounds, environments)
    return generator


def trainer_engine(trainer: Any) -> Any:
    """The trainer's vLLM generation object, or None when it generates with transformers."""
    return getattr(trainer, "vllm_generation", None) if getattr(trainer, "use_vllm", False) else None


class TrainerVLLMGenerator:
    """`Generator` over the trainer's vLLM engine, synced to the weights being trained."""

    def __init__(self, trainer: Any, tokenizer: Any, state: Any = None):
        if state is None:
            from posttrain.models.processes import process_state

            state = process_state()
        self.trainer, self.tokenizer, self.state = trainer, tokenizer, state
        self.engine = trainer_engine(trainer)
        if self.engine is None:
            raise ValueError("TrainerVLLMGenerator needs a trainer that generates with vLLM (use_vllm)")
        self.mode = self.engine.mode

    def sync(self) -> None:
        """Push the trained weights to the engine when the step moved since TRL last did (TRL's own rule)."""
        step = self.trainer.state.global_step
        if step != getattr(self.trainer, "_last_loaded_step", None):
            self.engine.sync_weights()
            self.trainer._last_loaded_step = step

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        return [[s.text for s in group] for group in self.generate_samples(prompts, params)]

    def generate_samples(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        self.sync()
        if self.mode == "colocate":
            return self._colocate(prompts, params)
        return self._server(prompts, params)

    def _colocate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        from posttrain.rollout.sharded import ShardedGenerator
        from posttrain.rollout.vllm import VLLMGenerator

        local = VLLMGenerator.from_engine(self.engine.llm)
        tp = max(int(getattr(self.engine, "tensor_parallel_size", 1) or 1), 1)
        groups = _TPGroups(self.state, tp)  # each tensor-parallel group is one shard
        return ShardedGenerator(local, state=groups, gather=groups.gather).generate_samples(prompts, params)

    def _server(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        from accelerate.utils import broadcast_object_list, gather_object

        everyone = gather_object([list(prompts)])  # each process may hold different prompts; the main sends all
        out: list[Any] = [None]
        if self.state.is_main_process:
            flat = [p for part in everyone for p in part]
            greedy = params.temperature == 0
            n = 1 if greedy else params.n
            reply = self.engine.vllm_client.generate(
                prompts=flat, n=n, temperature=0.0 if greedy else params.temperature, top_p=params.top_p,
                top_k=params.top_k, max_tokens=params.max_new_tokens, logprobs=None,
                generation_kwargs={"seed": params.seed, "stop": list(params.stop)},
            )  # fmt: skip
            texts = self.tokenizer.batch_decode(reply["completion_ids"], skip_special_tokens=True)
            grouped = [texts[i * n : (i + 1) * n] for i in range(len(flat))]
            out = [[g * params.n if greedy else g for g in grouped]]
        if self.state.num_processes > 1:
            broadcast_object_list(out, from_process=0)
        mine = out[0]
        start = sum(len(part) for part in everyone[: self.state.process_index]) if self.state.num_processes > 1 else 0
        return [[Sample(t) for t in group] for group in mine[start : start + len(prompts)]]


class _TPGroups:
    """The process layout `ShardedGenerator` sees under tensor parallelism: one shard per group of `tp` ranks, and a
    gather that keeps one copy per group (its ranks generated the same shard)."""

    def __init__(self, state: Any, tp: int):
        self.tp = tp
        self.num_processes = max(state.num_processes // tp, 1)
        self.process_index = state.process_index // tp

    def gather(self, items: list) -> list:
        from accelerate.utils import gather_object

        gathered = gather_object(items)
        return gathered[:: self.tp] if self.tp > 1 else gathered
