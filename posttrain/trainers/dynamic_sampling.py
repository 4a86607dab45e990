"""Dynamic sampling for the GRPO family (grpo, nft, rft): drop prompt groups whose rewards do not vary and generate
more until the generation batch is full again (DAPO, Yu et al. 2025, Sec. 3.2; NVlabs/NFT's `enable_filter_groups`).

A group whose answers all score the same carries no group-relative signal: GRPO's advantages are all 0 and NFT
masks it, yet it fills a slot of the optimizer batch (and counts in its normalisers). With
`algorithm.dynamic_sampling: true`, each generation is scored as TRL does, its zero-variance groups are dropped,
and further rounds of prompts (drawn from the training set by a seeded sampler of this wrapper's own) are generated
and scored until every process holds a full local generation batch of informative groups, or
`max_generation_rounds` is reached; then the batch is filled up by repeating the kept groups (and only if none was
kept does it go on with the zero-variance ones, which carry no gradient). Every process runs the same number of
rounds (generation is collective under vLLM and the rewards are gathered), so the batch shapes stay in step.

Built on TRL's extension point the other overrides use: `_generate_and_score_completions` wrapped with `super()`
(never copied), and `_calculate_rewards` to read the gathered rewards (tests/test_dynamic_sampling.py guards both).
Hand-written: TRL 1.16 has no dynamic sampling (an open feature request there).

Metrics per generation (`dynamic_sampling/...`): `kept_groups` and `dropped_groups` (summed over rounds and
processes), `rounds`, `fill_rate` (informative completions found / needed, capped at 1; below 1 the rest of the
batch repeats kept groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Keys of TRL's generation output that this wrapper knows how to select from and concatenate.
_PROMPT_KEYS = ("prompt_ids", "prompt_mask")  # left-padded
_SCALAR_KEYS = ("num_items_in_batch",)


@dataclass(frozen=True)
class DynamicSamplingOptions:
    """`algorithm:` keys of dynamic sampling, shared by grpo, nft and rft."""

    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "drop prompt groups whose rewards do not vary and generate more until the batch is full"},
    )
    max_generation_rounds: int = field(
        default=10,
        metadata={"help": "most generation rounds per batch with dynamic sampling (the first included)", "ge": 1},
    )

    def __post_init__(self) -> None:
        if int(self.max_generation_rounds) < 1:
            raise ValueError(f"algorithm.max_generation_rounds must be >= 1, got {self.max_generation_rounds}")


def varied_groups(rewards: Any, num_generations: int) -> Any:
    """Per completion: whether its group's rewards vary (max > min). `rewards` is (B,) in group order."""
    grouped = rewards.view(-1, num_generations)
    return (grouped.max(dim=1).values > grouped.min(dim=1).values).repeat_interleave(num_generations)


def select(batch: dict[str, Any], index: Any) -> dict[str, Any]:
    """The rows `index` of a generation output (per-completion tensors indexed, scalars kept)."""
    return {k: v if k in _SCALAR_KEYS or v is None else v[index] for k, v in batch.items()}


def concat(batches: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Concatenate generation outputs along the batch, padding prompts on the left and completion-aligned tensors on
    the right to the longest (each round pads to its own longest completion)."""
    import torch

    out: dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if key in _SCALAR_KEYS or values[0] is None:
            out[key] = values[0]
            continue
        if values[0].dim() == 1:
            out[key] = torch.cat(values)
            continue
        width = max(v.size(1) for v in values)
        fill = pad_id if key in ("prompt_ids", "completion_ids") else 0
        padded = []
        for v in values:
            pad = v.new_full((v.size(0), width - v.size(1)), fill)
            padded.append(torch.cat([pad, v] if key in _PROMPT_KEYS else [v, pad], dim=1))
        out[key] = torch.cat(padded)
    return out


class DynamicSamplingMixin:
    """Put before the GRPOTrainer (or NFTTrainer) in the bases; set `dynamic_options` (a DynamicSamplingOptions)."""

    dynamic_options: Any = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ds_rewards_per_func = rewards_per_func  # gathered over processes, in group order
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        options = self.dynamic_options
        if options is None or not options.dynamic_sampling or not self.model.training:
            return super()._generate_and_score_completions(inputs)
        import torch

        device, k, n = self.accelerator.device, self.num_generations, len(inputs)
        kept: list[dict[str, Any]] = []
        have = kept_groups = dropped_groups = rounds = 0
        first = None
        batch = inputs
        while True:
            output = super()._generate_and_score_completions(batch)
            rounds += 1
            first = first if first is not None else output
            keep = self._dynamic_keep(output, n)
            if keep.any() and have < n:
                kept.append(select(output, keep.nonzero().squeeze(1)))
                have += int(keep.sum())
            counts = self.accelerator.gather(torch.tensor([int(keep.sum()) // k, int((~keep).sum()) // k,
                                                           int(have < n)], device=device))  # fmt: skip
            counts = counts.view(-1, 3).sum(dim=0).tolist()
            kept_groups, dropped_groups = kept_groups + counts[0], dropped_groups + counts[1]
            if counts[2] == 0 or rounds >= options.max_generation_rounds:  # every process full, or out of rounds
                break
            batch = self._ds_more_prompts(n)
        pad_id = self.processing_class.pad_token_id
        if not kept:  # nothing informative in any round: go on with the first batch (it carries no GRPO gradient)
            merged = first
        else:
            merged = concat(kept, pad_id)
            total = merged["advantages"].size(0)
            order = torch.arange(n, device=merged["advantages"].device) % total  # repeat kept groups to fill
            merged = select(merged, order)
        mask = merged["completion_mask"]
        if merged.get("tool_mask") is not None:
            mask = mask * merged["tool_mask"]
        merged["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()  # as TRL counts it, after the filter
        fill = self.accelerator.gather(torch.tensor([min(have, n) / n], device=device)).mean().item()
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/kept_groups"].append(float(kept_groups))
        metrics["dynamic_sampling/dropped_groups"].append(float(dropped_groups))
        metrics["dynamic_sampling/rounds"].append(float(rounds))
        metrics["dynamic_sampling/fill_rate"].append(fill)
        return merged

    def _dynamic_keep(self, output: dict[str, Any], n: int) -> Any:
        """Per local completion: whether its group stays (GRPO: its rewards vary). NFT/RFT keep the groups their own
        loss calls informative (some answers correct and some not, truncated ones counting as wrong), the accuracy
        filter of the official runs."""
        device, k = self.accelerator.device, self.num_generations
        rewards = (self._ds_rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        return varied_groups(rewards, k)[local]

    def _ds_more_prompts(self, n: int) -> list[dict[str, Any]]:
        """`n // num_generations` prompts drawn without replacement (per pass over the data) by a sampler seeded with
        the run's seed and this process's index, each repeated `num_generations` times as TRL's sampler does."""
        import torch

        if getattr(self, "_ds_generator", None) is None:
            seed = int(self.args.seed) + 7919 * (self.accelerator.process_index + 1)
            self._ds_generator = torch.Generator().manual_seed(seed)
            self._ds_order: list[int] = []
        rows = []
        while len(rows) < n // self.num_generations:
            if not self._ds_order:
                self._ds_order = torch.randperm(len(self.train_dataset), generator=self._ds_generator).tolist()
            rows.append(self.train_dataset[self._ds_order.pop()])
        return [row for row in rows for _ in range(self.num_generations)]
