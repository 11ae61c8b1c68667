"""WebDataset-format loaders for LAION pairs, MMC4 and ChatGPT interleaved documents (see README.md here).

`build_train_data(spec, tokenizer, image_processor_cfg, runtime) -> TrainData`; iterate it per epoch for
`{dataset_name: batch}` dicts following the batch contract in docs/architecture.md.
"""

from __future__ import annotations

import functools
import logging
import os

from ..spec import DatasetSpec, RunSpec
from .drops import DataStalledError, DropCounter, DropSample, ImagePairingError
from .images import ImageTransform, as_image_spec
from .interleaved import DocumentRules, InterleavedBatcher, prepare_document, wants_member
from .laion import WANTED_EXTS, LaionBatcher, prepare_laion
from .loader import TrainData, steps_for
from .shards import expand_shards, read_shard_sizes
from .stream import StreamPlan, mix_seed, name_seed
from .tokens import TokenInfo, token_info

__all__ = ["build_train_data", "epoch_steps", "build_stream_plan", "TrainData", "DataStalledError", "DropSample", "ImagePairingError"]

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_DROPS = 2000


def _laion_prepare(sample: dict, counter: DropCounter, tokens: TokenInfo):
    return prepare_laion(sample, tokens)


def _document_prepare(sample: dict, counter: DropCounter, rules: DocumentRules, tokens: TokenInfo):
    return prepare_document(sample, rules, tokens, counter)


def build_stream_plan(ds: DatasetSpec, seed: int, tokenizer, image_processor_cfg, runtime, *,
                      max_consecutive_drops: int = MAX_CONSECUTIVE_DROPS) -> StreamPlan:
    """One dataset's stages, bound to this rank."""
    field = f"data.datasets.{ds.name}.shards"
    tokens = token_info(tokenizer)
    transform = ImageTransform(as_image_spec(image_processor_cfg), draft=ds.decode_draft,
                               kernel=ds.decode_resize == "crop")
    if ds.kind == "laion":
        wanted = WANTED_EXTS.__contains__
        prepare = functools.partial(_laion_prepare, tokens=tokens)
        make_batcher = functools.partial(LaionBatcher, ds.batch_size, transform, tokenizer, tokens,
                                         ds.effective_max_tokens(), ds.flip_prob)
    else:
        rules = DocumentRules(ds.kind, ds.max_images, ds.min_images, ds.sim_threshold, ds.min_image_bytes,
                              ds.single_image_drop_prob, ds.flip_prob, ds.effective_max_tokens())
        wanted = wants_member
        prepare = functools.partial(_document_prepare, rules=rules, tokens=tokens)
        make_batcher = functools.partial(InterleavedBatcher, ds.batch_size, transform, tokenizer, tokens, rules)
    return StreamPlan(
        name=ds.name, urls=expand_shards(ds.shards, field), resampled=ds.resampled,
        seed=mix_seed(seed, name_seed(ds.name)), rank=runtime.rank, world_size=runtime.world_size,
        workers=max(1, ds.workers), shuffle_buffer=ds.shuffle_buffer, shuffle_initial=ds.shuffle_initial,
        wanted=wanted, prepare=prepare, make_batcher=make_batcher, max_consecutive_drops=max_consecutive_drops,
    )


def dataset_steps(ds: DatasetSpec, urls: list[str], world_size: int) -> int:
    """Batches per rank per epoch for one dataset: from samples_per_epoch, or a real pass from sizes.json."""
    samples = ds.samples_per_epoch
    if samples is None:
        samples = read_shard_sizes(urls, f"data.datasets.{ds.name}.samples_per_epoch")
    return steps_for(samples, ds.batch_size, world_size, max(1, ds.workers))


def epoch_steps(spec: RunSpec, world_size: int) -> dict[str, int]:
    """Micro-steps per epoch on each rank, per dataset (an epoch is the shortest one's)."""
    return {ds.name: dataset_steps(ds, expand_shards(ds.shards, f"data.datasets.{ds.name}.shards"), world_size)
            for ds in spec.data.datasets}


def build_train_data(spec: RunSpec, tokenizer, image_processor_cfg, runtime, *,
                     max_consecutive_drops: int = MAX_CONSECUTIVE_DROPS, pin_memory: bool = False) -> TrainData:
    """Every dataset of the spec, for this rank (`runtime`: rank and world_size). An epoch is the shortest dataset's
    step count (one micro-batch of every dataset per step); each rank gets the same number of steps. `pin_memory`:
    page-locked batches (on GPU runs: asynchronous copies to the device)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used again in forked workers
    plans = [build_stream_plan(ds, spec.run.seed, tokenizer, image_processor_cfg, runtime,
                               max_consecutive_drops=max_consecutive_drops) for ds in spec.data.datasets]
    steps = {ds.name: dataset_steps(ds, p.urls, runtime.world_size) for ds, p in zip(spec.data.datasets, plans)}  # urls expanded once
    if len(set(steps.values())) > 1 and runtime.rank == 0:
        log.warning("datasets have different epoch lengths %s; an epoch is the shortest, %d steps", steps, min(steps.values()))
    return TrainData(plans, min(steps.values()), {ds.name: ds.workers for ds in spec.data.datasets},
                     pin_memory=pin_memory)
