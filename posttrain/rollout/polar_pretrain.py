"""POLAR pretraining data (Dou et al. 2025, Sec. 3): triplets sampled from a pool of policies.

For each prompt pick two different policies A and B; A writes two continuations (reference and chosen), B one
(rejected). Sampling at temperature 1.0, top-p 0.9, top-k 50. `build_pretrain_triplets` samples every policy
through this layer (hf on CPU, vLLM on GPUs), one policy at a time so each model loads once, and appends each chunk
of samples to that policy's shard as soon as it is generated: a killed build restarts where it stopped, and chunks
are seeded by (seed, policy, chunk) so a resumed build writes the same data as an uninterrupted one. The text
helpers and the fine-tuning converters are `posttrain.data.polar`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.data.polar import random_prefix, truncate_loops
from posttrain.errors import DataError
from posttrain.rollout import Generator, SamplingParams

CARD = "data_card.md"


@dataclass(frozen=True)
class PretrainBuild:
    """Settings of one pretraining-data build (saved as build.json; a resumed build must match them)."""

    policies: tuple[str, ...]
    max_new_tokens: int = 1024  # the paper caps outputs at 4096 tokens
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0
    chunk: int = 64  # prompts per generate call and per append to a shard
    backend: str = "hf"
    prefix_words: tuple[int, int] | None = None  # cut each prompt text to a random prefix of this many words

    def params(self, n: int, seed: int) -> SamplingParams:
        return SamplingParams(n=n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=seed)  # fmt: skip


def _stable_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def assign_pairs(n_prompts: int, n_policies: int, seed: int) -> list[tuple[int, int]]:
    """(A, B) policy indices per prompt, A != B, uniform over ordered pairs, fixed by the seed."""
    if n_policies < 2:
        raise DataError(f"POLAR pretraining needs at least two policies, got {n_policies}")
    pairs = []
    for i in range(n_prompts):
        rng = random.Random(_stable_int(seed, "pair", i))
        a, b = rng.sample(range(n_policies), 2)
        pairs.append((a, b))
    return pairs


class _Shard:
    """One policy's samples: jsonl lines {prompt_id, texts: {role: text}}, appended chunk by chunk."""

    def __init__(self, path: Path):
        self.path = path

    def done_ids(self) -> set[int]:
        return set(self.read())

    def read(self) -> dict[int, dict[str, str]]:
        found: dict[int, dict[str, str]] = {}
        if not self.path.exists():
            return found
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write: its chunk is regenerated
            found[row["prompt_id"]] = row["texts"]
        return found

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        with self.path.open("a") as fh:
            fh.write(text)
            fh.flush()


def build_pretrain_triplets(
    prompts: Sequence[str],
    out_dir: str | Path,
    build: PretrainBuild,
    *,
    make_generator: Callable[[str], Generator] | None = None,
    progress: bool = True,
) -> Path:
    """Sample the pool and write out_dir/triplets.jsonl (+ data_card.md, build.json); returns the triplets path.

    `make_generator(policy)` returns a Generator for one policy (default: posttrain.rollout with build.backend).
    """
    out = Path(out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    saved = out / "build.json"
    settings = {**asdict(build), "n_prompts": len(prompts), "prompts_hash": _hash_prompts(prompts)}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
    if saved.exists():
        before = json.loads(saved.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise DataError(
                f"{out}: holds a build with different settings ({', '.join(changed)}); resuming would mix two "
                "datasets. Use another --out, or the same settings to resume."
            )
    else:
        saved.write_text(json.dumps(settings, indent=1))

    texts = list(prompts)
    if build.prefix_words:
        lo, hi = build.prefix_words
        texts = [random_prefix(t, random.Random(_stable_int(build.seed, "prefix", i)), lo, hi)
                 for i, t in enumerate(texts)]  # fmt: skip
    pairs = assign_pairs(len(texts), len(build.policies), build.seed)
    factory = make_generator or _default_factory(build)
    for k, policy in enumerate(build.policies):
        # Prompts where this policy is A need two samples (reference, chosen); where it is B, one (rejected).
        jobs = [(i, 2 if a == k else 1) for i, (a, b) in enumerate(pairs) if k in (a, b)]
        _sample_policy(policy, k, jobs, texts, out / "samples" / f"{k:03d}.jsonl", build, factory, progress)

    shards = [_Shard(out / "samples" / f"{k:03d}.jsonl").read() for k in range(len(build.policies))]
    path = out / "triplets.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    empty = 0
    with tmp.open("w") as fh:
        for i, (a, b) in enumerate(pairs):
            ref, chosen = shards[a][i]["A"]
            rejected = shards[b][i]["B"][0]
            if not (ref.strip() and chosen.strip() and rejected.strip()):
                empty += 1  # a policy that stopped at once: no text to discriminate, and the schema refuses it
                continue
            fh.write(json.dumps({"prompt": texts[i], "reference": ref, "chosen": chosen, "rejected": rejected,
                                 "policy_a": build.policies[a], "policy_b": build.policies[b], "prompt_id": i})
                     + "\n")  # fmt: skip
    tmp.replace(path)
    (out / CARD).write_text(data_card(build, len(texts), pairs, empty))
    return path


def _sample_policy(policy, k, jobs, texts, shard_path, build, factory, progress) -> None:
    from tqdm.auto import tqdm

    shard = _Shard(shard_path)
    done = shard.done_ids()
    chunks = [jobs[s : s + build.chunk] for s in range(0, len(jobs), build.chunk)]
    todo = [(c, chunk) for c, chunk in enumerate(chunks) if not all(i in done for i, _ in chunk)]
    if not todo:
        return
    generator = factory(policy)  # loaded only when this policy has work left
    bar = tqdm(total=len(jobs), initial=len(jobs) - sum(len(ch) for _, ch in todo), disable=not progress,
               desc=f"policy {k + 1}/{len(build.policies)} {policy}", unit="prompt")  # fmt: skip
    for c, chunk in todo:
        rows = []
        for n, role in ((2, "A"), (1, "B")):
            ids = [i for i, m in chunk if m == n]
            if not ids:
                continue
            outs = generator.generate([texts[i] for i in ids], build.params(n, _stable_int(build.seed, k, c, role)))
            rows += [{"prompt_id": i, "role": role, "texts": [truncate_loops(t) for t in o]} for i, o in zip(ids, outs)]
        merged: dict[int, dict[str, list[str]]] = {}
        for r in rows:
            merged.setdefault(r["prompt_id"], {})[r["role"]] = r["texts"]
        shard.append({"prompt_id": i, "texts": t} for i, t in merged.items())
        bar.update(len(chunk))
    bar.close()
    del generator


def _default_factory(build: PretrainBuild) -> Callable[[str], Generator]:
    from posttrain.rollout.factory import make_generator

    return lambda policy: make_generator(build.backend, model_path=policy, batch_size=build.chunk)


def _hash_prompts(prompts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in prompts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()


def data_card(build: PretrainBuild, n_prompts: int, pairs: Sequence[tuple[int, int]], empty: int = 0) -> str:
    prefixes = "as given"
    if build.prefix_words:
        prefixes = f"random prefixes of {build.prefix_words[0]}-{build.prefix_words[1]} words"
    counts_a = [sum(a == k for a, _ in pairs) for k in range(len(build.policies))]
    counts_b = [sum(b == k for _, b in pairs) for k in range(len(build.policies))]
    lines = [
        "# POLAR pretraining triplets",
        "",
        f"{n_prompts - empty} triplets from {n_prompts} prompts, built by `posttrain data polar-pretrain` (seed "
        f"{build.seed}); {empty} dropped because a sample was empty. Each row: policy_a wrote `reference` and "
        "`chosen`, policy_b wrote `rejected` (Dou et al. 2025).",
        "",
        f"Sampling: temperature {build.temperature}, top-p {build.top_p}, top-k {build.top_k}, at most "
        f"{build.max_new_tokens} new tokens, backend `{build.backend}`; repetition loops at the end of a sample "
        "are cut to two repeats of their unit.",
        f"Prompts: {prefixes}.",
        "",
        "| policy | rows as A (reference + chosen) | rows as B (rejected) |",
        "|---|---|---|",
        *[f"| `{p}` | {a} | {b} |" for p, a, b in zip(build.policies, counts_a, counts_b)],
        "",
    ]
    return "\n".join(lines)


# ---- fine-tuning rows -------------------------------------------------------------------------------------------
