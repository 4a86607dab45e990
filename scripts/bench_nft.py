"""NFT's loss step vs GRPO's on the same batch and model: prints the ratio NFT / GRPO (goal <= 1.05).

Both trainers are built on the same tiny model; one generation batch is produced once by TRL's own
`_generate_and_score_completions` (through the NFT trainer, so it carries correctness and r_hat), then each
trainer's `_compute_loss` + backward is timed on exactly that batch, interleaved, many times. Generation is the
same code for both (NFT only wraps it), so the loss step is where they can differ.

    python scripts/bench_nft.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--completions", type=int, default=256)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data import arithmetic_split
    from posttrain.models.tiny import TinySpec, save_tiny_model
    from posttrain.trainers.nft import NFTOptions, trainer_class
    from reward_models.math import numeric_match_reward

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(Path(tmp) / "m", TinySpec())
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.padding_side = "left"
        config = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, report_to="none", beta=0.0, loss_type="dr_grpo",
            per_device_train_batch_size=args.completions, num_generations=8, max_completion_length=5,
            gradient_checkpointing=False, disable_tqdm=True,
        )  # fmt: skip
        rows = arithmetic_split("train", n=1024)
        kw = dict(model=model, reward_funcs=numeric_match_reward, args=config, train_dataset=rows, processing_class=tok)
        grpo, nft = GRPOTrainer(**kw), trainer_class()(**kw)
        nft.nft_options = NFTOptions()
        for t in (grpo, nft):
            t.current_gradient_accumulation_steps = 1
        batch = nft._generate_and_score_completions([rows[i] for i in range(args.completions)])
        model.train()

        def step(trainer) -> float:
            start = time.process_time()
            trainer._compute_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
            return time.process_time() - start

        times: dict[str, list[float]] = {"grpo": [], "nft": []}
        for _ in range(10):  # warm-up
            step(grpo), step(nft)
        for i in range(args.repeats):
            order = [("grpo", grpo), ("nft", nft)] if i % 2 == 0 else [("nft", nft), ("grpo", grpo)]
            for name, trainer in order:
                times[name].append(step(trainer))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"baseline: TRL GRPOTrainer._compute_loss (dr_grpo) + backward on the same batch of {args.completions} "
              f"completions, tiny 0.3M model, 1 thread, {args.repeats} interleaved repeats, median CPU time")  # fmt: skip
        print(f"grpo {med['grpo'] * 1000:.2f} ms   nft {med['nft'] * 1000:.2f} ms")
        print(f"ratio nft/grpo = {med['nft'] / med['grpo']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
