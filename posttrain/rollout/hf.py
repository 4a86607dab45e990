"""transformers backend: batched `generate` with left padding, n samples per prompt, seeded."""

from __future__ import annotations

from typing import Any

from posttrain.rollout import SamplingParams, truncate_at_stop


class HFGenerator:
    """Generate with a loaded transformers causal LM. Prompts are batched `batch_size` rows at a time
    (a row is one prompt × one sample), left-padded so every row's completion starts at the same column."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, show_progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        tokenizer = self.tokenizer
        rows = [p for p in prompts for _ in range(params.n)]
        # Sort by length so each batch pads little; results are put back in order afterwards.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        texts: list[str] = [""] * len(rows)
        was_training = self.model.training
        self.model.eval()
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        try:
            starts = range(0, len(order), self.batch_size)
            for start in tqdm(starts, desc="generate", disable=not self.show_progress, leave=False):
                idx = order[start : start + self.batch_size]
                enc = tokenizer([rows[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(self.model.device) for k, v in enc.items()}
                # transformers' sampling draws from torch's global RNG; seed it per batch from our own generator
                # so results depend only on (params.seed, batch contents), not on what ran before.
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                with torch.no_grad():
                    out = self.model.generate(**enc, **self._generate_kwargs(params))
                completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(idx, completions):
                    texts[i] = truncate_at_stop(text, params.stop)
        finally:
            tokenizer.padding_side = padding_side
            self.model.train(was_training)
        return [texts[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if params.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None
            )
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs
