"""The step loop: batches -> engine -> metrics -> checkpoints, for any engine and any set of datasets."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from ..engines.base import StepStats
from ..runtime import Runtime
from .checkpoint import CheckpointManager, TrainState

MAX_CONSECUTIVE_SKIPS = 20


def optimizer_steps_per_epoch(micro_steps_per_epoch: int, grad_accum_steps: int) -> int:
    steps = micro_steps_per_epoch // grad_accum_steps
    if steps < 1:
        raise ValueError(
            f"an epoch has {micro_steps_per_epoch} micro-steps, fewer than optim.grad_accum_steps={grad_accum_steps}: "
            f"raise data.datasets[*].samples_per_epoch or lower the accumulation"
        )
    return steps


def optimizer_step(engine, batches: Iterator, weights: Mapping[str, float], runtime: Runtime, metrics) -> StepStats:
    """GA micro-steps (one backward each, on the weighted sum of dataset losses), then one engine step.
    A non-finite loss on any rank makes every rank skip the update (decided with one collective: bug B6)."""
    bad = None  # stays on the loss's device: one host sync per optimizer step (the all-reduce), not per micro-step
    skip = False
    for micro in range(engine.grad_accum_steps):
        with metrics.data_wait_timer():
            batch = next(batches)
        losses = engine.forward(batch, weights)
        finite = torch.isfinite(losses["loss"].detach())
        bad = ~finite if bad is None else bad | ~finite
        if micro == engine.grad_accum_steps - 1:
            # decided before the last backward, not after it: the host then waits for the forward only, and queues
            # the backward and the optimizer step (host-heavy under DeepSpeed) while the device runs the backward
            skip = runtime.all_reduce_max(float(bad)) > 0
        engine.backward(losses["loss"])
        metrics.observe(batch, losses)
    return engine.step(skip=skip)


def train_loop(engine, data, spec, runtime: Runtime, checkpoints: CheckpointManager, metrics, state: TrainState, total_steps: int) -> TrainState:
    """Run until `total_steps` optimizer steps. On a resumed run the caller has already restored `data`."""
    per_epoch = optimizer_steps_per_epoch(data.steps_per_epoch, engine.grad_accum_steps)
    weights = {d.name: d.loss_weight for d in spec.data.datasets}
    consecutive_skips = 0
    while state.step < total_steps:
        if state.step_in_epoch >= per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if state.step_in_epoch == 0:
            data.set_epoch(state.epoch)
        batches = iter(data)
        while state.step_in_epoch < per_epoch and state.step < total_steps:
            stats = optimizer_step(engine, batches, weights, runtime, metrics)
            state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
            state.samples_seen += metrics_samples(spec, engine, runtime)
            state.skipped_steps += int(stats.skipped)
            consecutive_skips = consecutive_skips + 1 if stats.skipped else 0
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise FloatingPointError(f"{consecutive_skips} optimizer steps in a row skipped (non-finite loss or gradients) at step {state.step}")
            runtime.heartbeat(state.step)
            metrics.step(state.step, stats, state, data.drop_counts() if metrics.should_log(state.step) else None)
            if checkpoints.should_save(state.step, total_steps):
                checkpoints.save(engine, state, spec, {"data": data.state_dict(), "drop_counts": data.drop_counts()})
    return state


def metrics_samples(spec, engine, runtime: Runtime) -> int:
    return sum(d.batch_size for d in spec.data.datasets) * engine.grad_accum_steps * runtime.world_size
