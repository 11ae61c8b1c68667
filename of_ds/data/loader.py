"""Per-dataset DataLoaders over the worker streams, and `TrainData`: all datasets in lock-step, with exact resume.

Batch order: step t of an epoch comes from logical worker t % W (each logical worker yields its batches in
order), which is the DataLoader's round-robin over its W processes. A resumed epoch starts at step s by giving
DataLoader process i the role of logical worker (s + i) % W, each continuing after its saved sample count.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import signal
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .drops import add_counts
from .stream import StreamPlan, worker_batches

STATE_VERSION = 1


def steps_for(samples: int, batch_size: int, world_size: int, workers: int) -> int:
    """The original's epoch arithmetic: batches per rank, rounded up to a multiple of the workers."""
    per_rank = math.ceil(samples / (batch_size * world_size))
    return math.ceil(per_rank / workers) * workers


def batches_of_worker(worker: int, workers: int, start: int, stop: int) -> int:
    """How many of the steps [start, stop) belong to `worker` (steps go round-robin)."""
    first = start + (worker - start) % workers
    return len(range(first, stop, workers))


class _EpochStream(IterableDataset):
    """The batches of steps [start, stop) of one epoch, split over DataLoader processes (or the main process)."""

    def __init__(self, plan: StreamPlan, epoch: int, start: int, stop: int, consumed: list[int]):
        self.plan, self.epoch, self.start, self.stop, self.consumed = plan, epoch, start, stop, consumed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        process = info.id if info is not None else 0
        w = (self.start + process) % self.plan.workers
        n = batches_of_worker(w, self.plan.workers, self.start, self.stop)
        yield from worker_batches(self.plan, w, self.epoch, self.consumed[w], n)


@dataclass
class DatasetPosition:
    step: int = 0
    consumed: list[int] = field(default_factory=list)


def ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker: SIGTERM and SIGINT are the main process's to act on (it finishes its step and saves a
    checkpoint). A launcher or scheduler signals the whole process tree; torch's workers would die of it and take
    the step with them. They still end with the main process (torch's workers watch it, and `_kill_workers_at_exit`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register
def _kill_workers_at_exit() -> None:
    """At the main process's exit, daemonic children still alive (loader workers of an iterator that an error left
    open) get SIGKILL. multiprocessing's own exit handler, which runs after this one, would SIGTERM them, which
    they ignore, and then wait for them forever."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class TrainData:
    """All datasets of a run for one rank. Iterating yields `{dataset_name: batch}` for the current epoch."""

    def __init__(self, plans: list[StreamPlan], steps_per_epoch: int, num_workers: dict[str, int], pin_memory: bool = False):
        self.plans = plans
        self._pin_memory = pin_memory  # page-locked batches: their host-to-GPU copies run asynchronously
        self.steps_per_epoch = steps_per_epoch
        self._num_workers = num_workers  # DataLoader processes per dataset (0: main process)
        self._epoch = 0
        self._positions = {p.name: DatasetPosition(0, [0] * p.workers) for p in plans}
        self._drops: dict[str, dict[str, int]] = {p.name: {} for p in plans}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at its beginning, the current one where it stopped."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._positions = {p.name: DatasetPosition(0, [0] * p.workers) for p in self.plans}

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _loader(self, plan: StreamPlan) -> DataLoader:
        pos = self._positions[plan.name]
        workers = self._num_workers[plan.name]
        stream = _EpochStream(plan, self._epoch, pos.step, self.steps_per_epoch, list(pos.consumed))
        return DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                          persistent_workers=False, pin_memory=self._pin_memory,
                          worker_init_fn=ignore_stop_signals if workers else None)

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        start = {name: pos.step for name, pos in self._positions.items()}
        if len(set(start.values())) > 1:
            raise RuntimeError(f"datasets are at different steps {start}; the loader state is inconsistent")
        iterators = {p.name: iter(self._loader(p)) for p in self.plans}
        try:
            for step in range(next(iter(start.values()), 0), self.steps_per_epoch):
                out, metas = {}, {}
                for plan in self.plans:
                    batch = next(iterators[plan.name])
                    metas[plan.name] = batch.pop("_meta")
                    out[plan.name] = batch
                for plan in self.plans:  # record the position only once every dataset's batch is in hand
                    worker, consumed, drops = metas[plan.name]
                    if worker != step % plan.workers:
                        raise RuntimeError(f"dataset '{plan.name}': step {step} came from worker {worker}, "
                                           f"expected {step % plan.workers}")
                    pos = self._positions[plan.name]
                    pos.step = step + 1
                    pos.consumed[worker] = consumed
                    add_counts(self._drops[plan.name], drops)
                yield out
        finally:
            iterators.clear()  # shuts the DataLoader processes down when the loop stops early

    def drop_counts(self) -> dict[str, dict[str, int]]:
        """dataset -> reason -> count, over the batches consumed on this rank (restored by load_state_dict)."""
        return {name: dict(sorted(c.items())) for name, c in self._drops.items()}

    def state_dict(self) -> dict:
        """The position right after the last batch yielded: epoch, and per dataset the step, next worker, per-worker
        sample counts and drop counts. Per rank: each rank saves and loads its own."""
        plan0 = self.plans[0]
        return {
            "version": STATE_VERSION,
            "rank": plan0.rank,
            "world_size": plan0.world_size,
            "epoch": self._epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "datasets": {
                p.name: {
                    "workers": p.workers,
                    "step": self._positions[p.name].step,
                    "next_worker": self._positions[p.name].step % p.workers,
                    "consumed": list(self._positions[p.name].consumed),
                    "drops": dict(self._drops[p.name]),
                }
                for p in self.plans
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (same datasets, world size, workers and epoch length)."""
        plan0 = self.plans[0]
        problems = []
        if state.get("version") != STATE_VERSION:
            problems.append(f"version {state.get('version')} (expected {STATE_VERSION})")
        if state.get("world_size") != plan0.world_size:
            problems.append(f"world size {state.get('world_size')} (this run: {plan0.world_size})")
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            problems.append(f"steps_per_epoch {state.get('steps_per_epoch')} (this run: {self.steps_per_epoch})")
        saved = state.get("datasets", {})
        if set(saved) != {p.name for p in self.plans}:
            problems.append(f"datasets {sorted(saved)} (this run: {sorted(p.name for p in self.plans)})")
        for p in self.plans:
            if p.name in saved and saved[p.name].get("workers") != p.workers:
                problems.append(f"{p.name}: {saved[p.name].get('workers')} workers (this run: {p.workers})")
        if problems:
            raise ValueError("loader state does not match this run: " + "; ".join(problems))
        self._epoch = int(state["epoch"])
        self._positions = {
            name: DatasetPosition(int(s["step"]), [int(c) for c in s["consumed"]]) for name, s in saved.items()
        }
        self._drops = {name: dict(s["drops"]) for name, s in saved.items()}
