"""Rollout throughput: the hf backend batched vs one prompt at a time on the tiny arithmetic model.

Baseline: HFGenerator with batch_size=1 (one prompt at a time), timed on a subset of the prompts and scaled to the
full set (it is linear in the number of prompts). Greedy, 5 new tokens, one torch thread; the median wall time of
`--repeats` runs after one warm-up call. Goal: batch_size=64 >= 5x the baseline on a 2-core machine.

With `--vllm MODEL` (needs vllm and a CUDA GPU) it also times VLLMGenerator against HFGenerator(batch_size=64) on
MODEL, both on the GPU.

    python scripts/bench_rollout.py [--prompts 256] [--serial-subset 64] [--repeats 3] [--vllm MODEL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)

BASELINE = "HFGenerator with batch_size=1 (one prompt at a time)"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy imports are not rollout cost
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_hf(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.logging import disable_progress_bar

    from posttrain.data import arithmetic_split
    from posttrain.models.loading import load_tokenizer
    from posttrain.models.tiny import save_tiny_model
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFGenerator

    disable_progress_bar()  # transformers' save/load bars would interleave with the table
    torch.set_num_threads(1)
    prompts = list(arithmetic_split("eval", n=args.prompts)["prompt"])
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_tiny_model(tmp))
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = load_tokenizer(model_dir)

    subset = prompts[: args.serial_subset]
    serial = median_seconds(lambda: HFGenerator(model, tokenizer, batch_size=1).generate(subset, params), args.repeats)
    serial_full = serial * len(prompts) / len(subset)
    print(f"tiny arithmetic model, {len(prompts)} prompts, greedy, max_new_tokens={args.max_new_tokens}, 1 thread")
    print(f"baseline: {BASELINE}")
    print(
        f"  batch_size=1   {serial_full:7.2f} s  ({len(prompts) / serial_full:7.1f} prompts/s; "
        f"timed on {len(subset)} prompts, scaled)"
    )
    serial_out = HFGenerator(model, tokenizer, batch_size=1).generate(subset, params)
    for batch_size in args.batch_sizes:
        gen = HFGenerator(model, tokenizer, batch_size=batch_size)
        seconds = median_seconds(lambda gen=gen: gen.generate(prompts, params), args.repeats)
        same = sum(a == b for a, b in zip(gen.generate(subset, params), serial_out))
        print(
            f"  batch_size={batch_size:<4d}{seconds:7.2f} s  ({len(prompts) / seconds:7.1f} prompts/s)  "
            f"speedup {serial_full / seconds:5.1f}x vs baseline  "
            f"(greedy outputs equal to baseline on {same}/{len(subset)})"
        )


def bench_vllm(args: argparse.Namespace) -> None:
    import torch

    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("--vllm needs the vllm package and a CUDA GPU: pip install -e '.[vllm]' on a GPU machine")
    if not torch.cuda.is_available():
        sys.exit("--vllm needs a CUDA GPU (vLLM has no CPU build in this setup)")
    from transformers import AutoModelForCausalLM

    from posttrain.data import arithmetic_split
    from posttrain.models.loading import load_tokenizer
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFGenerator
    from posttrain.rollout.vllm import VLLMGenerator

    prompts = list(arithmetic_split("eval", n=args.prompts)["prompt"])
    params = SamplingParams(temperature=0, max_new_tokens=args.vllm_max_new_tokens)
    hf = HFGenerator(AutoModelForCausalLM.from_pretrained(args.vllm).cuda(), load_tokenizer(args.vllm), batch_size=64)
    hf_seconds = median_seconds(lambda: hf.generate(prompts, params), args.repeats)
    vllm_gen = VLLMGenerator(args.vllm, gpu_memory_utilization=0.5)
    vllm_seconds = median_seconds(lambda: vllm_gen.generate(prompts, params), args.repeats)
    print(f"{args.vllm}, {len(prompts)} prompts, greedy, max_new_tokens={args.vllm_max_new_tokens}, GPU")
    print("baseline: HFGenerator with batch_size=64 on the GPU")
    print(f"  hf    {hf_seconds:7.2f} s")
    print(f"  vllm  {vllm_seconds:7.2f} s  speedup {hf_seconds / vllm_seconds:5.1f}x vs baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--serial-subset", type=int, default=64, help="prompts timed at batch_size=1, then scaled")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm", metavar="MODEL", help="also time VLLMGenerator vs HFGenerator on MODEL (GPU)")
    parser.add_argument("--vllm-max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.vllm:
        bench_vllm(args)  # checked first so a missing vllm/GPU fails before the CPU benchmark runs
    bench_hf(args)


if __name__ == "__main__":
    main()
