"""One worker's stream: a pure function of (run seed, dataset, rank, worker, epoch).

shard order (resampled, or a seeded permutation split by rank and worker)
  -> tar samples -> prepare (filter, count drops) -> seeded shuffle buffer -> positions 0, 1, 2, ...
  -> per-sample RNG (flips, drops) -> batcher -> batches tagged with (worker, samples consumed, drop counts)

Resume replays the cheap part (everything before the batcher; no image decoding) up to the saved position, with
drop counting switched off for the replayed samples, so the batches that follow are exactly the uninterrupted ones.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from .drops import DataStalledError, DropCounter, DropSample
from .shards import iter_tar_samples

_TAG_SHARDS, _TAG_PERMUTE, _TAG_SHUFFLE, _TAG_SAMPLE = 1, 2, 3, 4


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (order matters); cheap enough to call once per sample."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def name_seed(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass
class StreamPlan:
    """Everything a worker needs to produce its batches (built once per dataset, inherited by forked workers)."""

    name: str
    urls: list[str]
    resampled: bool
    seed: int  # run seed mixed with the dataset name
    rank: int
    world_size: int
    workers: int  # logical workers per rank (>= 1; 1 when the loader runs in the main process)
    shuffle_buffer: int
    shuffle_initial: int
    wanted: Callable[[str], bool]
    prepare: Callable[[dict, DropCounter], Any]
    make_batcher: Callable[[], Any]
    max_consecutive_drops: int


def shard_order(plan: StreamPlan, worker: int, epoch: int) -> Iterator[str]:
    """The endless shard sequence of one (rank, worker) slot.

    Resampled: draws with replacement. Otherwise: the concatenation of seeded permutations (pass 0, 1, ...; the
    same on every rank) dealt round-robin to the world_size * workers slots, so every slot always has shards and
    one epoch's passes split the data evenly however many shards there are.
    """
    slot, slots = plan.rank * plan.workers + worker, plan.world_size * plan.workers
    n = len(plan.urls)
    if plan.resampled:
        rng = random.Random(mix_seed(plan.seed, _TAG_SHARDS, plan.rank, worker, epoch))
        while True:
            yield plan.urls[rng.randrange(n)]
    index, cached_pass, order = slot, -1, []
    while True:
        p, j = divmod(index, n)
        if p != cached_pass:
            order = list(range(n))
            random.Random(mix_seed(plan.seed, _TAG_PERMUTE, epoch, p)).shuffle(order)
            cached_pass = p
        yield plan.urls[order[j]]
        index += slots


def prepared_samples(plan: StreamPlan, urls: Iterable[str], counter: DropCounter) -> Iterator[Any]:
    """Read shards and keep what `prepare` accepts; stops with DataStalledError if the shards yield nothing."""
    empty_shards = 0
    for url in urls:
        found = False
        for sample in iter_tar_samples(url, counter, plan.wanted):
            found = True
            try:
                item = plan.prepare(sample, counter)
            except DropSample as e:
                counter.drop(e.reason)
                continue
            yield item
        empty_shards = 0 if found else empty_shards + 1
        if empty_shards >= max(2 * len(plan.urls), 8):
            top = ", ".join(f"{r}={n}" for r, n in counter.counts.most_common(3)) or "no drops counted"
            raise DataStalledError(f"dataset '{plan.name}': {empty_shards} shards in a row gave no samples ({top})")


def shuffled(items: Iterator[Any], bufsize: int, initial: int, rng: random.Random,
             before_output: Callable[[int], None]) -> Iterator[Any]:
    """A seeded shuffle buffer: fills to `initial` before the first output, then grows to `bufsize`.

    `before_output(i)` runs before the pulls that produce output i (resume uses it to stop counting replays).
    """
    buf: list[Any] = []
    exhausted = False
    i = 0
    while True:
        before_output(i)
        target = max(1, min(bufsize, initial + i))
        while not exhausted and len(buf) < target:
            try:
                buf.append(next(items))
            except StopIteration:
                exhausted = True
        if not buf:
            return
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()
        i += 1


def worker_batches(plan: StreamPlan, worker: int, epoch: int, skip: int, n_batches: int) -> Iterator[dict]:
    """`n_batches` batches of one logical worker, after its first `skip` shuffled samples (already consumed).

    Each batch carries `_meta` = (worker, samples consumed including this batch, drop counts since the last batch).
    """
    if n_batches <= 0:
        return
    counter = DropCounter(plan.name, plan.max_consecutive_drops)

    def count_from(i: int) -> None:
        counter.enabled = i >= skip

    shuffle_rng = random.Random(mix_seed(plan.seed, _TAG_SHUFFLE, plan.rank, worker, epoch))
    items = prepared_samples(plan, shard_order(plan, worker, epoch), counter)
    stream = shuffled(items, plan.shuffle_buffer, plan.shuffle_initial, shuffle_rng, count_from)
    sample_seed = mix_seed(plan.seed, _TAG_SAMPLE, plan.rank, worker, epoch)
    batcher = plan.make_batcher()
    produced = 0
    for position, item in enumerate(stream):
        if position < skip:
            continue
        try:
            full = batcher.add(item, random.Random(sample_seed ^ position))
        except DropSample as e:
            counter.drop(e.reason)
            continue
        counter.ok()
        if full:
            batch = batcher.finish()
            batch["_meta"] = (worker, position + 1, counter.take())
            yield batch
            produced += 1
            if produced == n_batches:
                return
    raise RuntimeError(f"dataset '{plan.name}': worker {worker}'s endless stream ended")  # unreachable: shard_order never ends
