"""`trainer: rft`: rejection-sampling fine-tuning, online: SFT on the verifier-accepted samples, i.e. the NFT trainer
(posttrain.trainers.nft) without the negative term and with omega = 1 — NFT's baseline in Chen et al. 2025."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.registry import TrainerSpec
from posttrain.trainers import nft


@dataclass(frozen=True)
class RFTOptions(nft.NFTOptions):
    """NFT's options with RFT's defaults: omega = 1, no implicit-negative term, all-correct groups kept (for RFT
    they are SFT data)."""

    weight: nft.Weight = field(default="one", metadata={"help": "omega(q); RFT weighs every accepted answer the same"})
    negatives: bool = field(default=False, metadata={"help": "the implicit-negative term (True turns RFT into NFT)"})
    mask_uninformative: bool = field(
        default=False, metadata={"help": "drop all-correct / all-wrong groups (RFT keeps all-correct: SFT data)"}
    )


SPEC = TrainerSpec(
    name="rft",
    description="rejection-sampling fine-tuning: SFT on the verifier-accepted samples, online (NFT without negatives)",
    options=RFTOptions,
    library_config=nft.SPEC.library_config,
    method_keys=nft.SPEC.method_keys,
    needs_rewards=True,
    curves=nft.SPEC.curves,
    train_schema=nft.SPEC.train_schema,
    eval_schema=nft.SPEC.eval_schema,
    generates=True,
    tools=True,
    paper="[Scaling Relationship on Learning Mathematical Reasoning with Large Language Models]"
    "(https://arxiv.org/abs/2308.01825)",
)

plan = nft.plan
problems = nft.problems
rehearse = nft.rehearse
train = nft.train
