"""A synthetic world for POLAR where the ideal reward is known exactly: policies are random Markov chains.

Each policy is a first-order chain over a small alphabet: it continues a prompt from the prompt's last symbol.
The pool has `n_train` chains for pretraining, `n_heldout` chains never trained on, and `n_checkpoints`
"checkpoints" interpolated between two training chains (similar policies: the hard negatives of the paper's pool).
A POLAR triplet takes two different policies A and B: A writes the reference and the chosen continuation, B the
rejected one.

Because every policy's likelihood is computable, so is the ideal POLAR reward (a Bayes-optimal discriminator that
knows the reference came from A): log P_A(c | p) - log mean_{B != A} P_B(c | p), up to an offset per reference.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from posttrain.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset

SPLITS = ("train", "heldout")
DEFAULT_TRAIN_POLICIES = 12


@dataclass(frozen=True)
class MarkovWorld:
    """The policy pool; the same arguments always give the same chains."""

    alphabet: str = "abcdefgh"
    n_train: int = DEFAULT_TRAIN_POLICIES
    n_heldout: int = 4
    n_checkpoints: int = 3
    concentration: float = 0.1  # Dirichlet concentration of each transition row: lower = more distinct policies
    prompt_length: tuple[int, int] = (2, 6)
    response_length: int = 16
    seed: int = 0

    @cached_property
    def chains(self) -> dict[str, np.ndarray]:
        """Policy name -> transition matrix T[prev, next] (rows sum to 1)."""
        import numpy as np

        rng = np.random.default_rng(self.seed)
        v = len(self.alphabet)
        base = min(self.n_train, DEFAULT_TRAIN_POLICIES)
        chains = {f"train-{i}": rng.dirichlet([self.concentration] * v, size=v) for i in range(base)}
        chains |= {f"heldout-{i}": rng.dirichlet([self.concentration] * v, size=v) for i in range(self.n_heldout)}
        # Training chains past the default twelve come from their own stream, so a larger pool keeps the same
        # held-out chains (and the same first twelve): accuracies across pool sizes compare on one held-out set.
        extra = np.random.default_rng([self.seed, 1])
        chains |= {f"train-{i}": extra.dirichlet([self.concentration] * v, size=v) for i in range(base, self.n_train)}
        if self.n_checkpoints:
            # Checkpoints along a training run from train-0 to train-1: neighbours differ by a small step.
            start, end = chains["train-0"], chains["train-1"]
            for k in range(1, self.n_checkpoints + 1):
                lam = k / (self.n_checkpoints + 1)
                chains[f"ckpt-{lam:.2f}"] = (1 - lam) * start + lam * end
        return chains

    def pool(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise DataError(f"polar_markov: unknown split '{split}' (known: {', '.join(SPLITS)})")
        prefix = ("heldout-",) if split == "heldout" else ("train-", "ckpt-")
        return [name for name in self.chains if name.startswith(prefix)]

    def _index(self, text: str) -> list[int]:
        try:
            return [self.alphabet.index(ch) for ch in text]
        except ValueError as err:
            raise DataError(f"polar_markov: text {text!r} has a symbol outside the alphabet {self.alphabet!r}") from err

    def sample(self, policy: str, prompt: str, rng: np.random.Generator, length: int | None = None) -> str:
        """A continuation of `prompt` by `policy` (temperature 1: the chain itself)."""
        chain = self.chains[policy]
        prev = self._index(prompt[-1])[0]
        out = []
        for _ in range(length or self.response_length):
            prev = int(rng.choice(len(self.alphabet), p=chain[prev]))
            out.append(self.alphabet[prev])
        return "".join(out)

    def sample_mixture(self, target: str, other: str, a: float, prompt: str, rng: np.random.Generator) -> str:
        """A continuation from the token-level mixture (1 - a) * target + a * other."""
        import numpy as np

        mixed = (1 - a) * self.chains[target] + a * self.chains[other]
        prev = self._index(prompt[-1])[0]
        out = []
        for _ in range(self.response_length):
            prev = int(rng.choice(len(self.alphabet), p=mixed[prev] / np.sum(mixed[prev])))
            out.append(self.alphabet[prev])
        return "".join(out)

    def prompt(self, rng: np.random.Generator) -> str:
        lo, hi = self.prompt_length
        return "".join(rng.choice(list(self.alphabet), size=int(rng.integers(lo, hi + 1))))

    def logprob(self, policy: str, prompt: str, text: str) -> float:
        chain = self.chains[policy]
        ids = self._index(prompt[-1] + text)
        return float(sum(math.log(chain[a, b]) for a, b in zip(ids, ids[1:])))

    def ideal_reward(self, policy: str, prompt: str, candidate: str, others: Sequence[str] | None = None) -> float:
        """log P_A(c | p) - log mean_B P_B(c | p) over the other policies B of A's pool (or `others`)."""
        others = [b for b in (others or self.pool(self._split_of(policy))) if b != policy]
        logs = [self.logprob(b, prompt, candidate) for b in others]
        top = max(logs)
        log_mean = top + math.log(sum(math.exp(x - top) for x in logs) / len(logs))
        return self.logprob(policy, prompt, candidate) - log_mean

    def _split_of(self, policy: str) -> str:
        return "heldout" if policy.startswith("heldout-") else "train"

    def triplets(self, split: str, n: int, seed: int) -> list[dict[str, str]]:
        """n rows of prompt/reference/chosen/rejected with provenance (policy_a wrote reference and chosen)."""
        import numpy as np

        pool = self.pool(split)
        if len(pool) < 2:
            raise DataError(f"polar_markov: the {split} pool needs at least two policies, has {len(pool)}")
        # Seeded by (world seed, split, seed): train and heldout rows never share a random stream.
        digest = hashlib.blake2b(f"{self.seed}/{split}/{seed}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        rows = []
        for _ in range(n):
            a, b = rng.choice(len(pool), size=2, replace=False)
            prompt = self.prompt(rng)
            rows.append(
                {
                    "prompt": prompt,
                    "reference": self.sample(pool[a], prompt, rng),
                    "chosen": self.sample(pool[a], prompt, rng),
                    "rejected": self.sample(pool[b], prompt, rng),
                    "policy_a": pool[a],
                    "policy_b": pool[b],
                }
            )
        return rows


def polar_markov_split(split: str = "train", n: int = 2000, seed: int = 0, world_seed: int = 0,
                       policies: int = DEFAULT_TRAIN_POLICIES) -> Dataset:  # fmt: skip
    """POLAR triplets from the MarkovWorld (`{synthetic: polar_markov, split: train|heldout, n: ...}`); `policies`
    is the number of training chains (the held-out chains do not depend on it)."""
    from datasets import Dataset

    if not (isinstance(policies, int) and not isinstance(policies, bool) and policies >= 2):
        raise DataError(f"polar_markov: policies must be an integer >= 2, got {policies!r}")
    return Dataset.from_list(MarkovWorld(seed=world_seed, n_train=policies).triplets(split, n, seed))


def reference_bayes_score(world: MarkovWorld, prompt: str, reference: str, candidate: str) -> float:
    """The best reward that, like a POLAR RM, sees only the reference and not the pool: log P(c | r) - log P(c),
    with both predictives under the world's Dirichlet prior on transition rows (counts from the reference's
    transitions, the candidate's own earlier transitions updating both). Its held-out accuracy is the ceiling an RM
    that generalises to unseen policies can reach; the pool-knowing `ideal_reward` is above it."""
    v, alpha = len(world.alphabet), world.concentration
    ref = world._index(prompt[-1] + reference)
    cand = world._index(prompt[-1] + candidate)
    seen = [[0] * v for _ in range(v)]
    for a, b in zip(ref, ref[1:]):
        seen[a][b] += 1
    own = [[0] * v for _ in range(v)]
    score = 0.0
    for a, b in zip(cand, cand[1:]):
        with_ref = (seen[a][b] + own[a][b] + alpha) / (sum(seen[a]) + sum(own[a]) + v * alpha)
        without = (own[a][b] + alpha) / (sum(own[a]) + v * alpha)
        score += math.log(with_ref) - math.log(without)
        own[a][b] += 1
    return score


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(v: Sequence[float]) -> np.ndarray:
        arr = np.asarray(v, dtype=float)
        order = arr.argsort()
        r = np.empty(len(arr))
        r[order] = np.arange(len(arr))
        for value in np.unique(arr):  # ties share their mean rank
            tie = arr == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def reference_spearman(world: MarkovWorld, score, split: str = "heldout", n_refs: int = 40, n_cands: int = 16,
                       seed: int = 0) -> list[float]:  # fmt: skip
    """Per reference: Spearman between learned scores and the ideal reward over candidates from the whole pool.

    `score(prompts, candidates, references) -> list[float]` is the RM (e.g. PolarScorer.score with reordered args).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = world.pool(split)
    out = []
    for _ in range(n_refs):
        a = pool[int(rng.integers(len(pool)))]
        prompt = world.prompt(rng)
        ref = world.sample(a, prompt, rng)
        cands = [world.sample(pool[int(rng.integers(len(pool)))], prompt, rng) for _ in range(n_cands)]
        learned = score([prompt] * n_cands, cands, [ref] * n_cands)
        ideal = [world.ideal_reward(a, prompt, c) for c in cands]
        out.append(spearman(learned, ideal))
    return out


def mixture_curve(world: MarkovWorld, score, mix: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                  split: str = "heldout", n: int = 200, seed: int = 0) -> list[float]:  # fmt: skip
    """Mean reward, against target-policy references, of candidates from (1 - a) * target + a * other, per a."""
    import numpy as np

    pool = world.pool(split)
    means = []
    for a in mix:
        rng = np.random.default_rng(seed)  # same targets, prompts and references for every a
        prompts, refs, cands = [], [], []
        for _ in range(n):
            target, other = rng.choice(len(pool), size=2, replace=False)
            prompt = world.prompt(rng)
            prompts.append(prompt)
            refs.append(world.sample(pool[target], prompt, rng))
            cands.append(world.sample_mixture(pool[target], pool[other], a, prompt, rng))
        means.append(float(np.mean(score(prompts, cands, refs))))
    return means


def policy_kl(world: MarkovWorld, target: str, model, tokenizer, n: int = 256, seed: int = 0) -> float:
    """Forward KL(target || policy) over continuations, per sequence: E_{c ~ target}[log P_T(c|p) - log pi(c|p)],
    estimated by teacher-forcing n target samples through the policy LM (no generation, so low variance)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    gaps = []
    model.eval()
    for _ in range(n):
        prompt = world.prompt(rng)
        cont = world.sample(target, prompt, rng)
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        picked = logps[torch.arange(len(p_ids) - 1, ids.shape[1] - 1), torch.tensor(c_ids)]
        gaps.append(world.logprob(target, prompt, cont) - float(picked.sum()))
    return float(np.mean(gaps))


def continuation_rows(world: MarkovWorld, policies: Sequence[str], n: int, seed: int) -> list[dict[str, str]]:
    """SFT rows (prompt, completion) with continuations from `policies` in turn: a policy LM trained on them starts
    as their mixture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = world.prompt(rng)
        rows.append({"prompt": prompt, "completion": world.sample(policies[i % len(policies)], prompt, rng)})
    return rows


def reference_rows(world: MarkovWorld, target: str | Sequence[str], n: int, seed: int) -> list[dict[str, str]]:
    """RL rows (prompt, reference): the reference is written by `target`, or, given several policies, by one drawn
    at random per row (the shuffled-reference control)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = [target] if isinstance(target, str) else list(target)
    rows = []
    for _ in range(n):
        prompt = world.prompt(rng)
        rows.append({"prompt": prompt, "reference": world.sample(pool[int(rng.integers(len(pool)))], prompt, rng)})
    return rows
