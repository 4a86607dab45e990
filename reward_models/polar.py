"""POLAR reward models (Dou et al. 2025, "Pre-Trained Policy Discriminators are General Reward Models";
InternLM/POLAR): the input layout, tokenisation with its truncation rules, scoring, the loss, and the `polar`
reward function for GRPO/NFT.

A POLAR RM scores (prompt P, reference R, candidate C): how likely C comes from the same policy as R. It is a
causal LM with a bias-free linear head to one scalar, read at the last token, an appended reward token:

    P + "\\n" + R + <split> + P + "\\n" + C + <reward>         ("sft" wrapper; "pretrain" drops the "\\n")

with P, R, C each the "\\n"-joined contents of their messages (no chat template). Two ways to build it:
- posttrain's own (`official=False`): each part tokenised on its own and the ids concatenated, with `<split>` and
  `<reward>` added to the tokenizer as special tokens. No decode/re-encode round trip, so the ids are exactly what
  the truncation rules kept.
- the released checkpoints' (`official=True`, e.g. `internlm/POLAR-7B`): the exact string their client builds
  (split = "<|reward|>", reward = "[UNUSED_TOKEN_130]"; truncated parts decoded back to text), then tokenised whole.
Truncation (both): each response keeps its first `max_response_length` tokens; the prompt, which appears twice,
gets half of what remains of `max_length` and keeps its last tokens.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from reward_models.errors import ModelError, RewardError
from reward_models.registry import register
from reward_models.scoring import is_messages, messages_text, whole_model_loading

if TYPE_CHECKING:
    import torch

SPLIT_TOKEN = "<|polar_split|>"
REWARD_TOKEN = "<|polar_reward|>"
# What InternLM/POLAR's RewardModelClient writes (src/polar/reward_func.py, `_encode`).
OFFICIAL_SPLIT_TOKEN = "<|reward|>"
OFFICIAL_REWARD_TOKEN = "[UNUSED_TOKEN_130]"
LAYOUT_FILE = "polar_layout.json"  # beside a trained RM: the layout it was trained with
# The official client reserves 4 tokens of max_length for the two "\n", the split and the reward token.
_LAYOUT_TOKENS = 4
# The official client's defaults (RewardModelClient: max_length=16384, max_response_length=4096; xtuner's POLAR
# configs train with the same); posttrain's own RMs default to PolarLayout's.
OFFICIAL_MAX_LENGTH, OFFICIAL_MAX_RESPONSE_LENGTH = 16384, 4096

Wrapper = Literal["sft", "pretrain"]
DEFAULT_WRAPPER: Wrapper = "sft"  # POLAR's official layout for fine-tuned RMs


def as_text(value: Any) -> str:
    """A prompt/response as POLAR sees it: a string as is, a message list as its contents joined by newlines."""
    if isinstance(value, str) or is_messages(value):
        return messages_text(value)
    raise RewardError(f"POLAR expects a string or a list of {{role, content}} messages, got {type(value).__name__}")


_THINK = re.compile(r"<think>(.*?)</think>(.*)", re.DOTALL)


def strip_think(text: str) -> str:
    """Drop a reasoning block as the official POLAR reward function does (`extract_thinking_content` in
    InternLM/POLAR's src/polar/reward_func.py): from the first `<think>` to the first `</think>` after it, the
    rest stripped of surrounding whitespace. A text without such a pair (an unclosed `<think>`, a stray
    `</think>`) is scored as it is; with several blocks, later ones stay in the answer."""
    match = _THINK.search(text)
    return match.group(2).strip() if match else text


@dataclass(frozen=True)
class PolarLayout:
    """How (prompt, reference, candidate) becomes one sequence."""

    wrapper: Wrapper = "sft"
    max_length: int = 4096  # whole sequence, tokens
    max_response_length: int = 1024  # each of reference and candidate, tokens (head kept)
    official: bool = False  # the released checkpoints' exact string layout

    def __post_init__(self) -> None:
        if self.wrapper not in ("sft", "pretrain"):
            raise RewardError(f"POLAR wrapper must be 'sft' or 'pretrain', got {self.wrapper!r}")
        if self.max_length <= 2 * self.max_response_length + _LAYOUT_TOKENS:
            raise RewardError(
                f"POLAR max_length {self.max_length} leaves no room for the prompt after two responses of "
                f"{self.max_response_length} tokens: raise max_length or lower max_response_length"
            )


class PolarEncoder:
    """Turns (prompt, reference, candidate) into token ids.

    posttrain's layout needs a tokenizer that knows its split and reward tokens (`add_polar_tokens`). The released
    checkpoints' layout (`official=True`) only builds the client's string and tokenises it, as the official client
    does: its markers need not be single tokens of the vocabulary.
    """

    def __init__(self, tokenizer: Any, layout: PolarLayout = PolarLayout()):
        self.tokenizer = tokenizer
        self.layout = layout
        self.split_token, self.reward_token = (
            (OFFICIAL_SPLIT_TOKEN, OFFICIAL_REWARD_TOKEN) if layout.official else (SPLIT_TOKEN, REWARD_TOKEN)
        )
        self.newline = [] if layout.wrapper == "pretrain" else self._ids("\n")
        if layout.official:
            self.reserved = _LAYOUT_TOKENS  # the client's count (its string is tokenised whole afterwards)
            return
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (self.split_token, self.reward_token)]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ModelError(
                f"the tokenizer has no {self.split_token!r}/{self.reward_token!r} tokens; use "
                "add_polar_tokens(model, tokenizer) first"
            )
        self.split_id, self.reward_id = ids
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # Everything but the parts: BOS, split, reward and two newlines, so a sequence never exceeds max_length.
        self.reserved = len(self.bos) + 2 + 2 * len(self.newline)

    def _ids(self, text: str) -> list[int]:
        # The official client counts the tokenizer's BOS in each part's length (and drops it when decoding).
        return self.tokenizer.encode(text, add_special_tokens=self.layout.official)

    def _responses(self, *responses: Any) -> list[list[int]]:
        limit = self.layout.max_response_length
        return [self._ids(as_text(r))[:limit] for r in responses]  # the head of each

    def _prompt(self, prompt: Any, budget: int) -> list[int]:
        p = self._ids(as_text(prompt))
        return p[-budget:] if budget > 0 else []  # the tail

    def parts(self, prompt: Any, reference: Any, candidate: Any) -> tuple[list[int], list[int], list[int]]:
        """Token ids of prompt, reference and candidate after truncation: each response keeps its head, the prompt
        (which appears twice) half of what remains of max_length, its tail."""
        ref, cand = self._responses(reference, candidate)
        budget = (self.layout.max_length - self.reserved - len(ref) - len(cand)) // 2
        return self._prompt(prompt, budget), ref, cand

    def pair_parts(self, prompt: Any, reference: Any, chosen: Any, rejected: Any) -> tuple[list[int], ...]:
        """(prompt, reference, chosen, rejected) ids for a training pair: one prompt truncation shared by both
        sequences, the smaller of the two budgets (xtuner's `tokenize_ref`, which trained the released RMs)."""
        ref, good, bad = self._responses(reference, chosen, rejected)
        budget = (self.layout.max_length - self.reserved - len(ref) - max(len(good), len(bad))) // 2
        return self._prompt(prompt, budget), ref, good, bad

    def text(self, prompt: Any, reference: Any, candidate: Any) -> str:
        """The layout as a string (what the official client sends; for posttrain's layout, for reading only)."""
        return self._text(*self.parts(prompt, reference, candidate))

    def _text(self, p: list[int], r: list[int], c: list[int]) -> str:
        p, r, c = (self.tokenizer.decode(x, skip_special_tokens=True) for x in (p, r, c))
        nl = "" if self.layout.wrapper == "pretrain" else "\n"
        # The official client always adds "\n" in the sft wrapper (its empty-response check never fires).
        return p + nl + r + self.split_token + p + nl + c + self.reward_token

    def _join(self, p: list[int], r: list[int], c: list[int]) -> list[int]:
        if self.layout.official:
            return self.tokenizer(self._text(p, r, c))["input_ids"]
        return [*self.bos, *p, *self.newline, *r, self.split_id, *p, *self.newline, *c, self.reward_id]

    def encode(self, prompt: Any, reference: Any, candidate: Any) -> list[int]:
        return self._join(*self.parts(prompt, reference, candidate))

    def encode_pair(self, prompt: Any, reference: Any, chosen: Any, rejected: Any) -> tuple[list[int], list[int]]:
        """(chosen ids, rejected ids) of a training triplet, sharing one truncated prompt (`pair_parts`)."""
        p, r, good, bad = self.pair_parts(prompt, reference, chosen, rejected)
        return self._join(p, r, good), self._join(p, r, bad)


def add_polar_tokens(model: Any, tokenizer: Any) -> int:
    """Add the split and reward tokens to `tokenizer` and `model` (new embedding rows = the mean embedding, so a
    pretrained model sees them as an average token rather than noise). Returns how many tokens were new."""
    import torch

    added = tokenizer.add_special_tokens({"additional_special_tokens": [SPLIT_TOKEN, REWARD_TOKEN]})
    if added:
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e}.values():
                if emb.weight.shape[0] > old:
                    emb.weight[old:] = emb.weight[:old].mean(dim=0)
    return added


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence, read at its last real token, the same under left or right padding.

    Calls the base model and the linear head directly rather than `AutoModelForSequenceClassification.forward`,
    which finds the last token through `pad_token_id` (wrong when pad = eos appears in the text) and gives left-
    padded rows shifted positions; here positions count real tokens only.
    """
    import torch

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    inner = getattr(model, "module", model)  # DDP and DeepSpeed's engine wrap the model being trained
    if inner is model:
        hidden = model.base_model(**inputs).last_hidden_state
    else:
        # A wrapped model must run its own forward (DDP readies its gradient all-reduce there): the base model's
        # output is taken from that forward with a hook, the head's pooled logits of the full forward are unused.
        captured: dict[str, Any] = {}

        def keep(module: Any, args: Any, output: Any) -> None:
            captured["hidden"] = output.last_hidden_state

        handle = inner.base_model.register_forward_hook(keep)
        try:
            model(**inputs)
        finally:
            handle.remove()
        hidden = captured["hidden"]
    index = torch.arange(input_ids.size(1), device=input_ids.device)
    last = (index * attention_mask.long()).argmax(-1)
    pooled = hidden[torch.arange(input_ids.size(0), device=input_ids.device), last]
    return score_head(inner)(pooled).squeeze(-1).float()


def score_head(model: Any) -> Any:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise ModelError(f"{type(model).__name__} has no scalar head (score/classifier/v_head): load it as a reward model")


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """POLAR's loss for both stages: -log sigmoid(r(p, ref, chosen) - r(p, ref, rejected)), no margin or penalty."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected).mean()


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Any, Any]:
    """(input_ids, attention_mask) tensors for token-id lists of different lengths."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[i, cols] = torch.tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


class PolarScorer:
    """Batched scoring of (prompt, reference, candidate) with a trained POLAR RM dir or a released checkpoint."""

    def __init__(self, model: Any, tokenizer: Any, layout: PolarLayout, *, batch_size: int = 16, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.encoder = PolarEncoder(tokenizer, layout)
        self.batch_size = batch_size
        self.device = device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        wrapper: Wrapper | None = None,
        max_length: int | None = None,
        max_response_length: int | None = None,
        batch_size: int = 16,
        device: str | None = None,
    ) -> PolarScorer:
        """Load a POLAR RM: a posttrain run's `final/` (sequence classifier + tokens) or a released checkpoint
        (InternLM2 remote code; detected by its tokenizer's reward token). Layout settings left as None come from
        the dir's `polar_layout.json` (written by `trainer: polar`, so scoring matches training), else defaults."""
        import json
        from pathlib import Path

        import torch

        saved = Path(path) / LAYOUT_FILE
        stored = json.loads(saved.read_text()) if saved.exists() else {}
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
            official = REWARD_TOKEN not in tokenizer.get_vocab() and OFFICIAL_REWARD_TOKEN in tokenizer.get_vocab()
            with whole_model_loading():  # not partitioned by a ZeRO-3 run that loads it as a reward
                if official:
                    model: Any = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        except OSError as err:
            raise ModelError(f"could not load POLAR reward model '{path}': {err}") from err
        default = PolarLayout() if not official else PolarLayout(max_length=OFFICIAL_MAX_LENGTH,
                                                                max_response_length=OFFICIAL_MAX_RESPONSE_LENGTH)  # fmt: skip
        layout = PolarLayout(
            wrapper or stored.get("wrapper", "sft"),
            max_length or stored.get("max_length", default.max_length),
            max_response_length or stored.get("max_response_length", default.max_response_length),
            official=official,
        )
        return cls(model, tokenizer, layout, batch_size=batch_size, device=device)

    def count_tokens(self, prompts: Sequence[Any], completions: Sequence[Any], references: Any = None) -> int:
        """Tokens of prompt, reference and candidate before truncation (the reward server's per-request budget)."""
        refs = references if references is not None else [""] * len(completions)
        ids = self.tokenizer([as_text(t) for t in (*prompts, *completions, *refs)], add_special_tokens=False)
        return sum(len(x) for x in ids["input_ids"]) if completions else 0

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], references: Sequence[Any] | None = None
    ) -> list[float]:

        if references is None:
            raise RewardError("POLAR scores a completion against a reference answer: pass references")
        if not len(prompts) == len(completions) == len(references):
            raise RewardError(
                f"POLAR: {len(prompts)} prompts, {len(completions)} completions, {len(references)} references"
            )
        return self.score_encoded([self.encoder.encode(p, r, c) for p, r, c in zip(prompts, references, completions)])

    def score_encoded(self, encoded: list[list[int]]) -> list[float]:
        """Scores of already encoded sequences (`PolarEncoder.encode`/`encode_pair`), batched, in input order."""
        import torch

        # Longest first: batches of similar length waste less padding; scores go back to input order.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ids, mask = pad_batch([encoded[i] for i in chunk], self.pad_id)
            with torch.no_grad():
                if self.encoder.layout.official:  # remote-code model: its forward reads the last token itself
                    values = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))[0]
                    values = values.squeeze(-1).float()
                else:
                    values = sequence_scores(self.model, ids.to(self.device), mask.to(self.device))
            for i, v in zip(chunk, values.tolist()):
                scores[i] = v
        return scores

    def score_triplets(self, rows: Any) -> tuple[list[float], list[float]]:
        """(chosen scores, rejected scores) of prompt/reference/chosen/rejected rows, in one batched pass."""
        pairs = [self.encoder.encode_pair(p, r, c, x)
                 for p, r, c, x in zip(rows["prompt"], rows["reference"], rows["chosen"], rows["rejected"])]  # fmt: skip
        scores = self.score_encoded([c for c, _ in pairs] + [x for _, x in pairs])  # as training encodes them
        return scores[: len(pairs)], scores[len(pairs) :]


@functools.lru_cache(maxsize=4)
def _cached_scorer(path: str, wrapper: str | None, max_length: int | None, max_response_length: int | None,
                   batch_size: int):  # fmt: skip
    return PolarScorer.from_pretrained(
        path, wrapper=wrapper, max_length=max_length, max_response_length=max_response_length, batch_size=batch_size
    )


@register("polar", column_options=("reference_column",), model_option="model", stand_in=add_polar_tokens)
def polar_reward(
    prompts: list[Any],
    completions: list[Any],
    *,
    model: str,
    reference_column: str = "reference",
    wrapper: Wrapper | None = None,  # None: the RM dir's polar_layout.json, else "sft"
    max_length: int | None = None,
    max_response_length: int | None = None,
    batch_size: int = 16,
    strip_thinking: bool = True,
    normalize: Literal["none", "self"] = "none",
    **columns: Any,
) -> list[float]:
    """POLAR reward for GRPO/NFT: score(prompt, the row's reference, completion).

    Scores compare only within one (prompt, reference); GRPO's group centering cancels that offset, so the raw
    score is the default. `normalize: self` subtracts the reference's own score, score(p, ref, ref), for users
    who compare or mix rewards across prompts (costs one extra scored sequence per prompt).
    """
    if reference_column not in columns:
        raise RewardError(
            f"reward 'polar' needs the dataset column '{reference_column}' (the reference answer for each prompt); "
            f"columns passed: {', '.join(sorted(columns)) or 'none'} (set kwargs.reference_column)"
        )
    references = columns[reference_column]
    texts = [as_text(c) for c in completions]
    if strip_thinking:
        texts = [strip_think(t) for t in texts]
    scorer = _cached_scorer(model, wrapper, max_length, max_response_length, batch_size)
    scores = scorer.score(prompts, texts, references)
    if normalize == "self":
        keys = {(as_text(p), as_text(r)): (p, r) for p, r in zip(prompts, references)}
        base = dict(zip(keys, scorer.score([v[0] for v in keys.values()], [v[1] for v in keys.values()],
                                            [v[1] for v in keys.values()])))  # fmt: skip
        scores = [s - base[(as_text(p), as_text(r))] for s, p, r in zip(scores, prompts, references)]
    elif normalize != "none":
        raise RewardError(f"reward 'polar': normalize must be 'none' or 'self', got {normalize!r}")
    return scores
