"""`posttrain train RECIPE --rehearse`: run any recipe for 2 optimizer steps on this machine's CPUs, under its own
accelerate setup shrunk to 2 processes, before GPU time is spent on it.

What a GPU recipe needs that a CPU lacks is substituted, and each substitution is said:
- the model: a tiny random model of the same architecture family (from the model dir's config.json or the hub
  shapes posttrain knows, `posttrain.models.memory.KNOWN_SHAPES`), with the recipe's options kept: LoRA, gradient
  checkpointing, the reference model when `beta > 0`; a diffusion model becomes a tiny latent stack;
- the launch: the recipe's accelerate config with 2 processes, fp32 and no offload, ZeRO stage or FSDP2 kept (DDP
  when the recipe names none);
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

The driver names no trainer: what it asks of one comes from its `SPEC` (the kind of model, whether it generates, a
reference model) and its module's `rehearse(edit)` hook (`posttrain.rehearsal_edit`), which shapes its batch; the
benchmark kinds of a suite shrink themselves (`posttrain.evaluation.kinds`). Modules: `prepare` (models, data,
rewards, the recipe), `suite` (the eval suite), `launch` (the two launches), `common`.
"""

from posttrain.rehearse.common import Rehearsal, RehearsalError
from posttrain.rehearse.launch import RehearsalFailed, run_rehearsal, tail_of_log
from posttrain.rehearse.prepare import prepare_rehearsal

__all__ = ["Rehearsal", "RehearsalError", "RehearsalFailed", "prepare_rehearsal", "run_rehearsal", "tail_of_log"]
