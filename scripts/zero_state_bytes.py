"""Bytes DeepSpeed holds per process for the model states of a ZeRO run, beside the memory plan's terms for it.

    accelerate launch --config_file recipes/accelerate/cpu/zero2.yaml scripts/zero_state_bytes.py --out z2.json
    accelerate launch --config_file recipes/accelerate/cpu/zero3.yaml scripts/zero_state_bytes.py --out z3.json

A tiny Llama (fp32 on CPUs, so every "16-bit" term of the plan is 4 bytes here) is prepared by accelerate with
AdamW and trained for two steps. Each term is read from DeepSpeed's ZeRO optimizer at the moment it exists:
  weights    ZeRO-2: every parameter (held whole); ZeRO-3: this process's flat partition of them
  gradients  this process's partition of the gradients in the model's dtype as the step begins (ZeRO-2:
             `averaged_gradients`; ZeRO-3: its flat gradient-partition buffer)
  optimizer  the fp32 master partition, its fp32 gradient and AdamW's m and v
the optimizer terms read inside the step (a pre-step hook on the torch AdamW; accelerate runs the step within
`backward`).
and compared with `posttrain.models.memory.model_state_terms` (the numbers `--dry-run` prints). Main process
prints the table; with --out every process writes its JSON (`<out>.rank<N>`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator

    from posttrain.models.memory import Launch, model_state_terms
    from posttrain.models.processes import process_state
    from posttrain.models.tiny import TinySpec, build_tiny_model

    state = process_state()
    accelerator = Accelerator()
    stage = accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin else None
    if stage not in (1, 2, 3):
        raise SystemExit("launch this under a DeepSpeed ZeRO config (recipes/accelerate/cpu/zero2.yaml or zero3.yaml)")
    spec = TinySpec(task="text", hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_layers=args.layers)
    model, tokenizer = build_tiny_model(spec)
    params = model.num_parameters()
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    data = torch.utils.data.DataLoader(torch.randint(5, len(tokenizer), (16, 32)), batch_size=4)
    model, optimizer, data = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data)
    zero = optimizer.optimizer  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
    measured: dict[str, int] = {}

    def in_step(inner, *_):  # the torch AdamW's pre-step hook: the fp32 gradient partition exists now
        master = zero.single_partition_of_fp32_groups if stage < 3 else zero.fp32_partitioned_groups_flat
        measured["fp32 master"] = tensor_bytes(master)
        measured["fp32 gradient"] = tensor_bytes(m.grad for m in master)
        measured["AdamW m, v"] = tensor_bytes(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())  # fmt: skip

    zero.optimizer.register_step_pre_hook(in_step)
    zero_step = zero.step

    def entering_step(*a, **k):
        # The partition of the gradients in the model's dtype, reduced during backward and released inside the
        # step once copied to fp32: ZeRO-2's `averaged_gradients`, ZeRO-3's flat gradient-partition buffer. (A
        # wrapper on this one instance, for measuring only: DeepSpeed has no hook at this point.)
        if stage < 3:
            measured["gradients"] = tensor_bytes(g for gs in zero.averaged_gradients.values() if gs is not None for g in gs)  # fmt: skip
        else:
            measured["gradients"] = tensor_bytes([zero.grad_partitions_flat_buffer])
        return zero_step(*a, **k)

    zero.step = entering_step
    for _, batch in zip(range(2), data):  # two steps: AdamW creates m and v in the first
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    if stage < 3:
        measured["weights"] = tensor_bytes(p for group in zero.bit16_groups for p in group)
    else:
        measured["weights"] = tensor_bytes(zero.fp16_partitioned_groups_flat)

    launch = Launch(processes=state.num_processes, zero_stage=stage)
    plan = {t.name: t.bytes for t in model_state_terms(params, params, 4, launch, largest_layer)}
    optimizer_bytes = measured["fp32 master"] + measured["fp32 gradient"] + measured["AdamW m, v"]
    rows = [
        ("weights", measured["weights"], next(v for k, v in plan.items() if k.startswith("weights"))),
        ("gradients", measured["gradients"], plan["gradients (32-bit)"]),
        ("optimizer (fp32 master, m, v, grads)", optimizer_bytes, plan["optimizer (fp32 master, m, v, grads)"]),
    ]
    result = {"rank": state.process_index, "processes": state.num_processes, "zero_stage": stage, "params": params,
              "measured": measured, "rows": [{"term": n, "measured": m, "plan": p} for n, m, p in rows]}  # fmt: skip
    if args.out:
        Path(f"{args.out}.rank{state.process_index}").write_text(json.dumps(result))
    if state.is_main_process:
        print(f"ZeRO-{stage}, {state.num_processes} processes, {params:,} parameters (fp32), process 0:")
        print(f"{'term':40s} {'DeepSpeed holds':>16s} {'plan':>12s}  ratio")
        for name, m, p in rows:
            print(f"{name:40s} {m:>16,d} {p:>12,.0f}  {m / p if p else float('nan'):.4f}")
    accelerator.wait_for_everyone()
    from posttrain.models.processes import end_processes

    end_processes()


if __name__ == "__main__":
    main()
