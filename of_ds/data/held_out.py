"""Held-out (validation) batches of a dataset's `val_shards`, the same at every evaluation and in every run.

A rank's batches are the training stream's, bound to the val shards with no shuffle buffer, no resampling, one
worker and epoch 0: the shards dealt to the ranks in one fixed (seeded) order, each read front to back, with the
training preprocessing (per-sample decisions seeded by position, as in training).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

from ..spec import DatasetSpec
from . import build_stream_plan
from .loader import steps_for
from .shards import expand_shards, read_shard_sizes
from .stream import StreamPlan, worker_batches


def held_out_plan(ds: DatasetSpec, seed: int, tokenizer, image_processor_cfg, rank: int, world_size: int) -> StreamPlan:
    """The stream plan of `ds`'s val_shards for one rank: one worker, no shuffle buffer, no resampling."""
    urls = expand_shards(ds.val_shards, f"data.datasets.{ds.name}.val_shards")
    fixed = ds.model_copy(update={"shards": urls, "resampled": False, "shuffle_buffer": 0, "shuffle_initial": 0, "workers": 1})
    return build_stream_plan(fixed, seed, tokenizer, image_processor_cfg, SimpleNamespace(rank=rank, world_size=world_size))


def held_out_batches(ds: DatasetSpec, seed: int, tokenizer, image_processor_cfg, rank: int, world_size: int) -> Iterator[dict]:
    """Rank `rank`'s validation batches of `ds`: `val_batches` of them, or the whole set (sizes.json)."""
    plan = held_out_plan(ds, seed, tokenizer, image_processor_cfg, rank, world_size)
    n = ds.val_batches
    if n is None:
        n = steps_for(read_shard_sizes(plan.urls, f"data.datasets.{ds.name}.val_shards"), ds.batch_size, world_size, 1)
    for batch in worker_batches(plan, 0, 0, 0, n):
        batch.pop("_meta")
        yield batch
