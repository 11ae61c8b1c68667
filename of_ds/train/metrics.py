"""Step metrics: a console line every N steps, `RUN_DIR/metrics.jsonl` always, a rank-0 progress bar, wandb.
Other rows (validation) go the same way through `log_row`.

Losses are averaged over the logging window and over ranks (the original logged rank 0's last micro-batch).
Throughput counts every rank's samples and real (attention-mask) tokens. MFU = achieved FLOP/s / (peak x ranks),
where the FLOPs per step come from `of_ds.model.flops.count_step_flops` and the peak from the device table.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..engines.base import host_float
from ..perf.peak import device_peak_tflops
from ..runtime import Runtime
from ..spec import RunSpec



def peak_memory_gib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS (KiB on Linux)
    except Exception:  # noqa: BLE001 - platform without resource
        return None


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class Metrics:
    def __init__(self, spec: RunSpec, runtime: Runtime, run_dir: Path, total_steps: int, flops_per_step: Optional[float] = None):
        self.rt, self.total_steps, self.every = runtime, total_steps, spec.logging.every_n_steps
        self.names = [d.name for d in spec.data.datasets]
        self.flops_per_step = flops_per_step  # one rank's forward+backward of one micro-step
        self.peak = device_peak_tflops(runtime.device)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.wandb = None
        if runtime.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if spec.logging.progress_bar:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, desc=spec.run.name, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                                disable=not sys.stderr.isatty())  # no bar frames in log files
            self.wandb = _start_wandb(spec, run_dir)
        self._reset_window()
        self.start_time = time.perf_counter()
        self.start_step: Optional[int] = None

    def _reset_window(self) -> None:
        self.loss_sums = {n: 0.0 for n in ["loss", *self.names]}
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
        for b in batches.values():
            self.samples += int(b["input_ids"].shape[0])
            self.tokens += int(b["attention_mask"].sum())

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step >= self.total_steps

    def step(self, step: int, stats, state, drops: Optional[dict] = None) -> Optional[dict]:
        """After each optimizer step; returns the logged row on log steps (every rank computes it: collective)."""
        if self.start_step is None:
            self.start_step = step - 1
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if not self.should_log(step):
            return None
        row = self._row(step, stats, state, drops)
        if self.rt.is_main:
            self.log_row(row, self._console(row))
        self._reset_window()
        return row

    def log_row(self, row: dict, line: str) -> None:
        """Rank 0: one row (its `step` included) to metrics.jsonl and wandb, and `line` to the console."""
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        (self.bar.write(line) if self.bar is not None else print(line, flush=True))
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def _row(self, step: int, stats, state, drops) -> dict:
        names = ["loss", *self.names]
        local = [float(torch.stack([p[n].float() for p in self._pending if n in p]).mean()) if self._pending else float("nan") for n in names]
        wait, elapsed = self.data_wait, time.perf_counter() - self.window_start
        reduced = self.rt.all_reduce_mean(local + [float(self.samples), float(self.tokens), wait])
        losses, (samples, tokens, wait) = reduced[: len(names)], reduced[len(names):]
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
        if drops:
            row["dropped"] = {k: sum(v.values()) for k, v in drops.items()}
        return row

    def _console(self, row: dict) -> str:
        parts = [f"step {row['step']}/{self.total_steps}", f"loss {row['loss']:.4f}"]
        parts += [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in row.items() if k.startswith("loss/")]
        parts.append(f"lr {row['lr']:.3g}")
        if row.get("grad_norm") is not None:
            parts.append(f"gnorm {row['grad_norm']:.3f}")
        parts.append(f"{row['samples_per_s']:.1f} samples/s {row['tokens_per_s']:.0f} tok/s")
        if "mfu" in row:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        elif "tflops_per_gpu" in row:
            parts.append(f"{row['tflops_per_gpu']:.2f} TFLOP/s")
        if "peak_mem_gib" in row:
            parts.append(f"mem {row['peak_mem_gib']:.2f}GiB")
        parts.append(f"data {row['data_wait_s']:.3f}s/step")
        if row.get("skipped_steps"):
            parts.append(f"skipped {row['skipped_steps']}")
        parts.append(f"eta {format_eta(row['eta_s'])}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(spec: RunSpec, run_dir: Path):
    w = spec.logging.wandb
    if w.mode == "disabled":
        return None
    import wandb

    return wandb.init(project=w.project or "of_ds", entity=w.entity, name=spec.run.name, mode=w.mode,
                      dir=str(run_dir), config=spec.to_dict(), resume="allow")
