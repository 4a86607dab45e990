"""Held-out generation split across the processes of an `accelerate launch` run.

Without it every rank generated the whole benchmark (the same work N times under DDP). accelerate has
`split_between_processes` and `gather_object` but no "generate a shard, gather, restore order" step for a
`Generator`; this wraps one in ~20 lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.rollout import Generator, SamplingParams


class ShardedGenerator:
    """Each rank generates a contiguous shard of the prompts; the shards are gathered back in prompt order.

    Every rank gets the same number of prompts (the last shard is padded with repeats of the last prompt, dropped
    after gathering), so every rank makes the same number of `generate` calls: under DeepSpeed ZeRO-3 each forward
    needs all ranks, and transformers' `generate` turns on `synced_gpus` itself there, so ranks that finish their
    tokens early keep stepping until all are done.
    """

    def __init__(self, generator: Generator, state: Any = None, gather: Callable[[list], list] | None = None):
        if state is None:
            from posttrain.models.processes import process_state

            state = process_state()
        if gather is None:
            from accelerate.utils import gather_object

            gather = gather_object
        self.generator = generator
        self.num_processes = state.num_processes
        self.process_index = state.process_index
        self.gather = gather
        self.tokenizer = getattr(generator, "tokenizer", None)

    def shard(self, prompts: list[str]) -> list[str]:
        """This rank's prompts (padded to the common shard length)."""
        per = -(-len(prompts) // self.num_processes)
        padded = list(prompts) + [prompts[-1]] * (per * self.num_processes - len(prompts))
        return padded[self.process_index * per : (self.process_index + 1) * per]

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        return self._sharded(self.generator.generate, prompts, params)

    def generate_samples(self, prompts: list[str], params: SamplingParams) -> list[list[Any]]:
        return self._sharded(self.generator.generate_samples, prompts, params)

    def _sharded(self, method: Callable, prompts: list[str], params: SamplingParams) -> list[list[Any]]:
        if self.num_processes == 1 or not prompts:
            return method(prompts, params)
        mine = method(self.shard(prompts), params)
        shards = self.gather([mine])  # one entry per rank, in rank order
        return [group for shard in shards for group in shard][: len(prompts)]
