"""Bytes FSDP2 holds per process for the model states of a run, beside the memory plan's terms for it.

    accelerate launch --config_file recipes/accelerate/cpu/fsdp2.yaml scripts/fsdp2_state_bytes.py --out f.json
    accelerate launch --config_file recipes/accelerate/cpu/fsdp2.yaml --mixed_precision bf16 \
        scripts/fsdp2_state_bytes.py --dtype bfloat16 --out f.json

A tiny Llama in `--dtype` is prepared by accelerate (FSDP2 on CPUs over gloo: posttrain.models.processes) with AdamW
and trained for two steps. Each term is the sum of this process's local shards (`DTensor.to_local()`):
  weights    the sharded parameters after the step (fp32 when accelerate upcast them for mixed precision)
  gradients  the sharded gradients after backward, before the step
  optimizer  AdamW's m and v after the step
and compared with `posttrain.models.memory.model_state_terms` for the launch this process runs in
(`launch_of_this_process`, from accelerate's environment: the numbers `--dry-run` prints for the same config).
FSDP2 pads dim 0 of a tensor that does not divide by the processes, so a rank holds up to one row more or less than
1/N. Main process prints the table; with --out every process writes its JSON (`<out>.rank<N>`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)


def local_bytes(tensors) -> int:
    """Bytes of this process's shards of `tensors` (DTensors) or of the tensors themselves."""
    shards = (t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None)
    return sum(s.numel() * s.element_size() for s in shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator

    from posttrain.models.memory import ModelShape, launch_of_this_process, model_state_terms
    from posttrain.models.processes import end_processes, process_state
    from posttrain.models.tiny import TinySpec, build_tiny_model

    state = process_state()
    accelerator = Accelerator()
    if not accelerator.is_fsdp2:
        raise SystemExit(f"launch this under an FSDP2 config (recipes/accelerate/cpu/fsdp2.yaml), not {state.distributed_type}")  # fmt: skip
    spec = TinySpec(task="text", hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_layers=args.layers)
    model, tokenizer = build_tiny_model(spec)
    model = model.to(getattr(torch, args.dtype))
    shape = ModelShape.from_config(model.config.to_dict())
    params = model.num_parameters()
    assert params == shape.params, (params, shape.params)
    data = torch.utils.data.DataLoader(torch.randint(5, len(tokenizer), (16, 32)), batch_size=4)
    model, optimizer, data = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data)
    measured: dict[str, int] = {}
    for _, batch in zip(range(2), data):  # two steps: AdamW creates m and v in the first
        with accelerator.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        measured["gradients"] = local_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    measured["weights"] = local_bytes(model.parameters())
    moments = (v for s in optimizer.optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    measured["optimizer"] = local_bytes(moments)

    launch = launch_of_this_process()
    mixed = launch.mixed_precision in ("bf16", "fp16")
    weight_bytes = 2 if args.dtype == "bfloat16" or mixed else 4  # as the plan reads a recipe (memory.plan_for)
    terms = model_state_terms(params, params, weight_bytes, launch, mixed_precision=mixed, layer=shape.layer_params,
                              output_unit=shape.output_unit_params)  # fmt: skip
    plan = {t.name.split(" (")[0]: t.bytes for t in terms}
    rows = [(name, measured[name], plan[name]) for name in ("weights", "gradients", "optimizer")]
    result = {"rank": state.process_index, "processes": state.num_processes, "kind": launch.kind, "dtype": args.dtype,
              "mixed_precision": launch.mixed_precision, "params": params,
              "rows": [{"term": n, "measured": m, "plan": p} for n, m, p in rows]}  # fmt: skip
    if args.out:
        Path(f"{args.out}.rank{state.process_index}").write_text(json.dumps(result))
    if state.is_main_process:
        print(f"{launch.kind}, {state.num_processes} processes, {params:,} parameters ({args.dtype}, mixed precision "
              f"{launch.mixed_precision}), process 0:")  # fmt: skip
        print(f"{'term':12s} {'FSDP2 holds':>12s} {'plan':>12s}  ratio")
        for name, m, p in rows:
            print(f"{name:12s} {m:>12,d} {p:>12,.0f}  {m / p if p else float('nan'):.4f}")
    accelerator.wait_for_everyone()
    end_processes()


if __name__ == "__main__":
    main()
