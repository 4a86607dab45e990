"""POLAR speed: RM training tokens/s vs TRL's RewardTrainer on equal-length pairs, and batched vs one-by-one scoring.

    python scripts/bench_polar.py [--steps 40 --repeats 3 --batch 16]

Baselines named in the output: TRL RewardTrainer (training; goal ratio >= 1.0) and PolarScorer with batch size 1
(scoring). Both trainers get the same tiny model, batch size and sequence lengths: TRL's prompt is POLAR's
prompt + reference, so each TRL sequence has as many tokens as each POLAR sequence. Runs are interleaved and the
median is reported; CPU time is compared as well as wall time (this machine's 2 vCPUs are often shared).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice("abcdefgh") for _ in range(k))

    return [{"prompt": text(12), "reference": text(24), "chosen": text(24), "rejected": text(24)} for _ in range(n)]


def model_and_tokenizer():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer("markov")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    return LlamaForSequenceClassification(config), tok


def args_for(cls, out: str, steps: int, batch: int):
    return cls(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
               logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
               bf16=False, remove_unused_columns=False, dataloader_num_workers=0, seed=0)  # fmt: skip


def time_polar(data, steps: int, batch: int) -> tuple[float, float, int]:
    from datasets import Dataset
    from transformers import TrainingArguments

    from posttrain.trainers.polar_trainer import PolarTrainer, TripletCollator, encode_rows
    from reward_models.polar import PolarEncoder, PolarLayout, add_polar_tokens

    model, tok = model_and_tokenizer()
    add_polar_tokens(model, tok)
    encoder = PolarEncoder(tok, PolarLayout("pretrain", max_length=256, max_response_length=64))
    train = encode_rows(Dataset.from_list(data), encoder, "bench")
    tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train.select(range(steps * batch)))
    with tempfile.TemporaryDirectory() as out:
        trainer = PolarTrainer(model=model, args=args_for(TrainingArguments, out, steps, batch),
                                        train_dataset=train, data_collator=TripletCollator(tok.pad_token_id))  # fmt: skip
        return (*_timed(trainer.train), tokens)


def time_trl(data, steps: int, batch: int) -> tuple[float, float, int]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tok = model_and_tokenizer()
    # Same token count per sequence as POLAR's pretrain layout: BOS + P + R + split + P + C + reward
    # versus TRL's prompt + response + EOS (posttrain tokenises without BOS here, TRL adds none for this tokenizer).
    pairs = [{"prompt": r["prompt"] + r["reference"] + "a" + r["prompt"], "chosen": r["chosen"] + "a",
              "rejected": r["rejected"] + "a"} for r in data]  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainer = RewardTrainer(model=model, args=args_for(RewardConfig, out, steps, batch),
                                train_dataset=Dataset.from_list(pairs), processing_class=tok)  # fmt: skip
        ds = trainer.train_dataset.select(range(steps * batch))
        tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds)
        return (*_timed(trainer.train), tokens)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_scoring(n: int = 256) -> tuple[float, float]:
    from reward_models.polar import PolarLayout, PolarScorer, add_polar_tokens

    model, tok = model_and_tokenizer()
    add_polar_tokens(model, tok)
    layout = PolarLayout("sft", max_length=256, max_response_length=64)
    data = rows(n, seed=1)
    args = ([r["prompt"] for r in data], [r["chosen"] for r in data], [r["reference"] for r in data])
    batched, single = PolarScorer(model, tok, layout, batch_size=64), PolarScorer(model, tok, layout, batch_size=1)
    t_batched = min(_timed(lambda: batched.score(*args))[0] for _ in range(3))
    t_single = _timed(lambda: single.score(*args))[0]
    return n / t_batched, n / t_single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = rows(args.steps * args.batch)
    results: dict[str, list[tuple[float, float, int]]] = {"polar": [], "trl": []}
    time_polar(data[: 2 * args.batch], 2, args.batch)  # warm-up: imports, first-call allocations
    time_trl(data[: 2 * args.batch], 2, args.batch)
    for _ in range(args.repeats):
        results["polar"].append(time_polar(data, args.steps, args.batch))
        results["trl"].append(time_trl(data, args.steps, args.batch))
    rate = {k: (statistics.median(t / w for w, _, t in v), statistics.median(t / c for _, c, t in v))
            for k, v in results.items()}  # fmt: skip
    print(f"training, {args.steps} steps x {args.batch} pairs, median of {args.repeats} interleaved runs:")
    print(f"  POLAR trainer       {rate['polar'][0]:9.0f} tokens/s wall  {rate['polar'][1]:9.0f} tokens/s CPU")
    print(f"  TRL RewardTrainer   {rate['trl'][0]:9.0f} tokens/s wall  {rate['trl'][1]:9.0f} tokens/s CPU")
    print(f"  ratio POLAR / TRL RewardTrainer: {rate['polar'][0] / rate['trl'][0]:.2f} wall, "
          f"{rate['polar'][1] / rate['trl'][1]:.2f} CPU (goal >= 1.0)")  # fmt: skip
    batched, single = bench_scoring()
    print(
        f"scoring 256 triplets: batched (64) {batched:.0f}/s, one by one {single:.0f}/s, ratio {batched / single:.1f}x"
    )


if __name__ == "__main__":
    main()
