"""The step loop: batches -> engine -> metrics -> checkpoints, for any engine and any set of datasets."""

from __future__ import annotations

import sys
from typing import Iterator, Mapping, Optional

import torch

from ..engines.base import StepStats
from ..runtime import Runtime
from ..spec import SpecError
from .checkpoint import CheckpointManager, TrainState
from .stop import StopFlag

MAX_CONSECUTIVE_SKIPS = 20


def optimizer_steps_per_epoch(micro_steps_per_epoch: int, grad_accum_steps: int) -> int:
    steps = micro_steps_per_epoch // grad_accum_steps
    if steps < 1:
        raise SpecError([
            f"optim.grad_accum_steps={grad_accum_steps}: an epoch has only {micro_steps_per_epoch} micro-steps; "
            f"raise data.datasets[*].samples_per_epoch or lower the accumulation"
        ])
    return steps


def optimizer_step(engine, batches: Iterator, weights: Mapping[str, float], runtime: Runtime, metrics,
                   stop: Optional[StopFlag] = None) -> StepStats:
    """GA micro-steps (one backward each, on the weighted sum of dataset losses), then one engine step.
    A non-finite loss on any rank makes every rank skip the update (bug B6). The flag stays on the device (an
    asynchronous all-reduce, then the engine's step): no host sync per step. The same all-reduce carries `stop`'s
    signal flag."""
    bad = None
    for micro in range(engine.grad_accum_steps):
        with metrics.data_wait_timer():
            batch = next(batches)
        losses = engine.forward(batch, weights)
        nonfinite = ~torch.isfinite(losses["loss"].detach())
        bad = nonfinite if bad is None else bad | nonfinite
        if micro == engine.grad_accum_steps - 1:
            # queued before the last backward, so that it overlaps the backward
            bad = runtime.any_rank(bad) if stop is None else stop.exchange(runtime, bad)
        engine.backward(losses["loss"])
        metrics.observe(batch, losses)
    return engine.step(nonfinite_loss=bad)


class SkipCounter:
    """Skipped-step flags kept as they come (device tensors on the fast paths) and read in one sync by `settle`:
    at log and checkpoint steps, and at least every MAX_CONSECUTIVE_SKIPS steps for the divergence guard."""

    def __init__(self, state: TrainState):
        self.state, self.pending, self.run = state, [], 0

    def add(self, skipped) -> None:
        self.pending.append(skipped)

    def settle(self) -> None:
        """Count the pending flags into `state.skipped_steps`; raise after MAX_CONSECUTIVE_SKIPS in a row."""
        if not self.pending:
            return
        device = next((f.device for f in self.pending if torch.is_tensor(f)), torch.device("cpu"))
        flags = torch.stack([torch.as_tensor(f, device=device).reshape(()).bool() for f in self.pending]).tolist()  # one sync
        self.pending = []
        for f in flags:
            self.state.skipped_steps += int(f)
            self.run = self.run + 1 if f else 0
            if self.run >= MAX_CONSECUTIVE_SKIPS:
                raise FloatingPointError(f"{self.run} optimizer steps in a row skipped (non-finite loss or gradients), by step {self.state.step}")


def train_loop(engine, data, spec, runtime: Runtime, checkpoints: CheckpointManager, metrics, state: TrainState, total_steps: int,
               stop: Optional[StopFlag] = None, validation=None) -> TrainState:
    """Run until `total_steps` optimizer steps, or until the ranks agree to stop on a signal (`stop`): that step
    is logged and checkpointed. On a resumed run the caller has already restored `data`. `validation(engine, step)`
    (train/validate.py) evaluates after the steps it is due at, before their checkpoint."""
    per_epoch = optimizer_steps_per_epoch(data.steps_per_epoch, engine.grad_accum_steps)
    left = data.steps_per_epoch - per_epoch * engine.grad_accum_steps
    if left and runtime.is_main:
        print(f"[of_ds] the last {left} micro-batch(es) of each epoch are not trained: an epoch has {data.steps_per_epoch} "
              f"micro-steps per rank, not a multiple of optim.grad_accum_steps={engine.grad_accum_steps} (the original "
              f"steps on the partial window)", flush=True)
    weights = {d.name: d.loss_weight for d in spec.data.datasets}
    per_step = {d.name: d.batch_size * engine.grad_accum_steps * runtime.world_size for d in spec.data.datasets}
    skips = SkipCounter(state)
    while state.step < total_steps:
        if state.step_in_epoch >= per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if state.step_in_epoch == 0:
            data.set_epoch(state.epoch)
        batches = iter(data)
        while state.step_in_epoch < per_epoch and state.step < total_steps:
            stats = optimizer_step(engine, batches, weights, runtime, metrics, stop)
            state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
            state.samples_seen += sum(per_step.values())
            for name, n in per_step.items():
                state.samples_seen_by_dataset[name] = state.samples_seen_by_dataset.get(name, 0) + n
            skips.add(stats.skipped)
            stopping = stop is not None and stop.should_stop()
            log = stopping or metrics.should_log(state.step)
            save = stopping or checkpoints.should_save(state.step, total_steps)
            if log or save or state.step % MAX_CONSECUTIVE_SKIPS == 0:
                skips.settle()
            runtime.heartbeat(state.step)
            metrics.step(state.step, stats, state, data.drop_counts() if log else None, force=stopping)
            val_loss = validation(engine, state.step) if validation is not None else None
            if save:
                if not log:
                    metrics.settle_totals(state)
                checkpoints.save(engine, state, spec, {"data": data.state_dict(), "drop_counts": data.drop_counts()}, val_loss)
            if stopping:
                if stop.signal is not None:  # this rank's own (another rank's console copy says "[rank R]")
                    print(f"[of_ds] {stop.signal} received: stopped at step {state.step}, checkpoint saved", file=sys.stderr, flush=True)
                return state
    skips.settle()
    metrics.settle_totals(state)
    return state
