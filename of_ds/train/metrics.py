"""Step metrics: one row every N steps, to every sink of `loggers.Loggers` (console and progress bar,
`RUN_DIR/metrics.jsonl`, wandb, TensorBoard) through `Metrics.log` (training rows here; validation rows from `validate.py`).

Losses are averaged over the logging window and over ranks (the original logged rank 0's last micro-batch).
Throughput counts every rank's samples and real (attention-mask) tokens. MFU = achieved FLOP/s / (peak x ranks),
where the FLOPs per step come from `of_ds.model.flops.count_step_flops` and the peak from the device table.
Rows also carry the run's totals, `samples_seen/<dataset>` and `tokens_seen/<dataset>` (every rank's, since step
0: kept in the train state, so that they carry over a resume).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..engines.base import host_float
from ..runtime import Runtime, device_peak_tflops
from ..spec import RunSpec
from .loggers import Loggers


def peak_memory_gib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS (KiB on Linux)
    except Exception:  # noqa: BLE001 - platform without resource
        return None


class Metrics:
    def __init__(self, spec: RunSpec, runtime: Runtime, run_dir: Path, total_steps: int, flops_per_step: Optional[float] = None):
        self.rt, self.total_steps, self.every = runtime, total_steps, spec.logging.every_n_steps
        self.names = [d.name for d in spec.data.datasets]
        self.flops_per_step = flops_per_step  # one rank's forward+backward of one micro-step
        self.peak = device_peak_tflops(runtime.device)
        self.loggers = Loggers(spec, Path(run_dir), total_steps, runtime.is_main)
        self.unsettled_tokens = {n: 0 for n in self.names}  # this rank's, not yet in the train state's totals
        self._reset_window()
        self.start_time = time.perf_counter()
        self.start_step: Optional[int] = None

    def _reset_window(self) -> None:
        self.micro = 0
        self.samples = self.tokens = 0
        self.data_wait = 0.0
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self._pending: list[dict[str, torch.Tensor]] = []

    @contextlib.contextmanager
    def data_wait_timer(self):
        t = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - t

    def observe(self, batches: Mapping[str, Mapping[str, torch.Tensor]], losses: Mapping[str, torch.Tensor]) -> None:
        """One micro-step; losses stay on the device until the next log line (no per-step host sync)."""
        self._pending.append({k: v.detach() for k, v in losses.items()})
        self.micro += 1
        for name, b in batches.items():
            tokens = int(b["attention_mask"].sum())
            self.samples += int(b["input_ids"].shape[0])
            self.tokens += tokens
            if name in self.unsettled_tokens:
                self.unsettled_tokens[name] += tokens

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step >= self.total_steps

    def step(self, step: int, stats, state, drops: Optional[dict] = None, force: bool = False) -> Optional[dict]:
        """After each optimizer step; returns the logged row on log steps (and with `force`; every rank computes
        it: collective)."""
        if self.start_step is None:
            self.start_step = step - 1
        self.window_steps += 1
        self.loggers.advance(step)
        if not (force or self.should_log(step)):
            return None
        row = self._row(step, stats, state, drops)
        self.log(row)
        self._reset_window()
        return row

    def log(self, row: dict) -> None:
        """Every row goes out here: console, metrics.jsonl, wandb, TensorBoard (rank 0; a no-op on the others).
        `row`: {"step": N, "name": number, ...}; nested dicts of numbers are plotted as `name/key`."""
        self.loggers.log(row)

    def settle_totals(self, state) -> None:
        """Collective: add every rank's token counts since the last row to the train state's totals (before a
        checkpoint that no row preceded, and at the end)."""
        counts = self.rt.all_reduce_mean([float(self.unsettled_tokens[n]) for n in self.names])
        self._add_tokens(state, counts)

    def _add_tokens(self, state, mean_counts: list[float]) -> None:
        for n, c in zip(self.names, mean_counts):
            state.tokens_seen_by_dataset[n] = state.tokens_seen_by_dataset.get(n, 0) + round(c * self.rt.world_size)
            self.unsettled_tokens[n] = 0

    def _row(self, step: int, stats, state, drops) -> dict:
        names = ["loss", *self.names]
        local = [float(torch.stack([p[n].float() for p in self._pending if n in p]).mean()) if self._pending else float("nan") for n in names]
        wait, elapsed = self.data_wait, time.perf_counter() - self.window_start
        totals = [float(self.unsettled_tokens[n]) for n in self.names]
        reduced = self.rt.all_reduce_mean(local + [float(self.samples), float(self.tokens), wait] + totals)
        losses, (samples, tokens, wait) = reduced[: len(names)], reduced[len(names): len(names) + 3]
        self._add_tokens(state, reduced[len(names) + 3:])
        world = self.rt.world_size
        row = {"step": step, "epoch": state.epoch}
        row.update({("loss" if n == "loss" else f"loss/{n}"): round(v, 6) for n, v in zip(names, losses)})
        row.update(
            lr=stats.lr, grad_norm=host_float(stats.grad_norm), skipped_steps=state.skipped_steps,
            samples_per_s=samples * world / elapsed, tokens_per_s=tokens * world / elapsed,
            step_time_s=elapsed / max(1, self.window_steps), data_wait_s=wait / max(1, self.window_steps),
        )
        if self.flops_per_step:
            tflops = self.flops_per_step * self.micro / elapsed / 1e12  # per rank
            row["tflops_per_gpu"] = tflops
            if self.peak:
                row["mfu"] = tflops / self.peak
        mem = peak_memory_gib(self.rt.device)
        if mem is not None:
            row["peak_mem_gib"] = round(mem, 3)
        done = step - (self.start_step or 0)
        rate = done / max(1e-9, time.perf_counter() - self.start_time)
        row["eta_s"] = (self.total_steps - step) / rate if rate > 0 else float("inf")
        row.update({f"samples_seen/{n}": state.samples_seen_by_dataset.get(n, 0) for n in self.names})
        row.update({f"tokens_seen/{n}": state.tokens_seen_by_dataset.get(n, 0) for n in self.names})
        if drops:
            row["dropped"] = {k: sum(v.values()) for k, v in drops.items()}
        return row

    def close(self) -> None:
        self.loggers.close()
