"""transformers backend: batched `generate` with left padding, n samples per prompt, seeded."""

from __future__ import annotations

from typing import Any

from posttrain.rollout import Sample, SamplingParams, truncate_at_stop


class HFGenerator:
    """Generate with a loaded transformers causal LM. Prompts are batched `batch_size` rows at a time
    (a row is one prompt × one sample), left-padded so every row's completion starts at the same column."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, show_progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        return [[s.text for s in group] for group in self.generate_samples(prompts, params)]

    def generate_samples(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        """Samples for each prompt, in a fork of torch's RNG: the per-batch seeding reseeds the global RNG, and left
        as it was, what a training run drew after a held-out evaluation (and the seed accelerate's data sampler takes,
        `torch.random.initial_seed()`) depended on whether the evaluation ran: a resumed run, which has no evaluation
        before training, drew other batches than the uninterrupted run."""
        import torch

        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._generate_samples(prompts, params)

    def _generate_samples(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        import torch
        from tqdm.auto import tqdm

        tokenizer = self.tokenizer
        rows = [p for p in prompts for _ in range(params.n)]
        # Sort by length so each batch pads little; results are put back in order afterwards.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        results: list[Sample] = [Sample("")] * len(rows)
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
                kwargs = self._generate_kwargs(params)
                if params.logprobs:
                    kwargs.update(return_dict_in_generate=True, output_logits=True)
                with torch.no_grad():
                    out = self.model.generate(**enc, **kwargs)
                sequences = out.sequences if params.logprobs else out
                new_tokens = sequences[:, enc["input_ids"].shape[1] :]
                completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                token_lps = self._token_logprobs(out.logits, new_tokens) if params.logprobs else None
                for row, (i, text) in enumerate(zip(idx, completions)):
                    sample = Sample(truncate_at_stop(text, params.stop))
                    if token_lps is not None:
                        keep = self._generated_length(new_tokens[row])
                        sample.token_ids = new_tokens[row, :keep].tolist()
                        sample.logprobs = token_lps[row, :keep].tolist()
                    results[i] = sample
        finally:
            tokenizer.padding_side = padding_side
            self.model.train(was_training)
        return [results[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @staticmethod
    def _token_logprobs(logits: tuple, tokens):
        """log p(token) from the raw logits of each step (before temperature/top-p), as a (rows, steps) tensor."""
        import torch

        stacked = torch.stack(logits, dim=1).float()  # (rows, steps, vocab)
        return torch.log_softmax(stacked, dim=-1).gather(-1, tokens[:, : stacked.shape[1], None]).squeeze(-1)

    def _generated_length(self, tokens) -> int:
        """Tokens up to and including the first EOS; the rest is padding of rows that finished early."""
        eos = (tokens == self.tokenizer.eos_token_id).nonzero()
        return int(eos[0, 0]) + 1 if len(eos) else len(tokens)

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
