"""The training loop's data: tokenised GLUE examples, length-grouped random batches (resumable and
sharded across DDP ranks through ``distributed.ShardedBatches``) and evaluation batches."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import torch

from . import distributed


def encode(tokenizer, ds, max_length: int) -> List[Dict[str, Any]]:
    text_a = list(ds["text_a"])
    text_b = list(ds["text_b"]) if "text_b" in ds.column_names else None
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    labels = list(ds["label"])
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(labels))]


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Random batches of similar-length examples (the Hugging Face Trainer's ``group_by_length``).

    Each epoch: a seeded random permutation, cut into mega-batches of ``MEGA`` batches, each
    sorted by length and cut into batches, served in random order. Padding to the longest
    example of a batch then costs little: on the demo's SST-2 sample a random batch of 32 is
    padded to 40 tokens on average for 13 real ones.
    """

    MEGA = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths, self.batch_size = list(lengths), batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        step = self.batch_size * self.MEGA
        batches = []
        for start in range(0, len(perm), step):
            mega = sorted(perm[start:start + step], key=lambda i: -self.lengths[i])
            batches += [mega[k:k + self.batch_size] for k in range(0, len(mega), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def train_loader(tokenizer, examples, batch_size: int, seed: int, group_by_length: bool,
                  ctx: distributed.Context = distributed.Context()):
    """(DataLoader, sampler): this rank's share of every global batch, resumable mid-epoch
    (``distributed.ShardedBatches``). A single process gets the order it always got."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    if group_by_length:
        batches = LengthGroupedBatches([len(e["input_ids"]) for e in examples], batch_size, seed)
        sampler = distributed.ShardedBatches(batches, batches.generator, ctx.rank, ctx.world_size)
        return torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate), sampler
    generator = torch.Generator().manual_seed(seed)
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(examples, generator=generator),
                                            batch_size, drop_last=False)
    sampler = distributed.ShardedBatches(batches, generator, ctx.rank, ctx.world_size)
    # generator=: the loader draws its seed from it, as DataLoader(shuffle=True, generator=...) does
    loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate, generator=generator)
    return loader, sampler


def eval_loader(tokenizer, examples, batch_size: int, ctx: distributed.Context = distributed.Context()):
    """Longest first: the metrics do not depend on the order, and batches of equal length pad least.
    Under DDP each rank evaluates every world-th example; ``evaluate`` gathers the predictions."""
    from transformers import DataCollatorWithPadding

    ordered = distributed.shard(sorted(examples, key=lambda e: -len(e["input_ids"])), ctx.rank, ctx.world_size)
    return torch.utils.data.DataLoader(ordered, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))


__all__ = ["encode", "LengthGroupedBatches", "train_loader", "eval_loader"]
