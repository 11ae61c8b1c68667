"""Where a metrics row goes: the console (and progress bar), `RUN_DIR/metrics.jsonl`, wandb, TensorBoard.

`Loggers.log(row)` hands one row (a flat dict with a "step"; nested dicts are flattened as `a/b`) to every sink
the spec enables; rank 0 holds the sinks, the other ranks none. wandb and TensorBoard get the resolved spec as
their config; wandb's run id is kept in `RUN_DIR/wandb_id`, so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from pathlib import Path
from typing import Optional

from ..spec import RunSpec

WANDB_ID = "wandb_id"
TENSORBOARD = "tensorboard"


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def flat_numbers(row: dict, prefix: str = "") -> dict[str, float]:
    """The row's finite numbers, nested dicts as `a/b` keys (what scalar loggers can plot)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


class JsonlSink:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        pass


class ConsoleSink:
    """A line per row (training rows in their fixed layout, other rows as `key value` pairs) and a progress bar
    on a terminal."""

    def __init__(self, spec: RunSpec, total_steps: int):
        self.total_steps, self.bar = total_steps, None
        terminal = getattr(sys.stderr, "terminal", sys.stderr)  # the console itself, not train.log's copy
        if spec.logging.progress_bar and terminal.isatty():  # no bar frames in log files
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=spec.run.name, file=terminal, dynamic_ncols=True, mininterval=1.0)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, row: dict) -> None:
        line = self.training_line(row) if "loss" in row and "lr" in row else self.plain_line(row)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def plain_line(self, row: dict) -> str:
        parts = [f"step {row['step']}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in flat_numbers(row).items() if k != "step"]
        return " | ".join(parts)

    def training_line(self, row: dict) -> str:
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


class WandbSink:
    """One wandb run per run dir: its id is made once and kept in RUN_DIR/wandb_id; a resume continues it.

    wandb logs through a service process of its own, a child of rank 0. A signal sent to the whole process tree (a
    launcher forwarding SIGTERM, a scheduler's preemption) ends it while the run goes on to its checkpoint; from
    then on wandb's calls fail, so the sink says so once and stops, and the other sinks go on."""

    def __init__(self, spec: RunSpec, run_dir: Path):
        import wandb

        w = spec.logging.wandb
        self.run = wandb.init(project=w.project or "of_ds", entity=w.entity, name=spec.run.name, mode=w.mode,
                              dir=str(run_dir), id=wandb_run_id(run_dir), resume="allow", config=spec.to_dict())
        self.lost: Optional[str] = None

    def log(self, row: dict) -> None:
        self._call(self.run.log, {k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self._call(self.run.finish)

    def _call(self, fn, *args, **kwargs) -> None:
        if self.lost is not None:
            return
        try:
            fn(*args, **kwargs)
        except (ConnectionError, BrokenPipeError) as e:  # its service process is gone
            self.lost = f"{type(e).__name__}: {e}"
            print(f"[of_ds] wandb stopped logging ({self.lost}: its service process ended, e.g. on a signal to the "
                  f"whole process tree); metrics.jsonl and the other sinks go on, and the next start continues the "
                  f"wandb run", file=sys.stderr, flush=True)


def wandb_run_id(run_dir: Path) -> str:
    """RUN_DIR/wandb_id, written on the run's first start."""
    path = Path(run_dir) / WANDB_ID
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class TensorBoardSink:
    """Scalars under RUN_DIR/tensorboard (a new event file per start; TensorBoard merges them by step) and the
    resolved spec as the text `spec`."""

    def __init__(self, spec: RunSpec, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD))
        self.writer.add_text("spec", "```yaml\n" + spec.to_yaml() + "```", global_step=0)

    def log(self, row: dict) -> None:
        step = int(row["step"])
        for k, v in flat_numbers(row).items():
            if k != "step":
                self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Loggers:
    """Every sink the spec enables (rank 0 only: the other ranks get none and `log` does nothing there)."""

    def __init__(self, spec: RunSpec, run_dir: Path, total_steps: int, is_main: bool):
        self.console: Optional[ConsoleSink] = None
        self.wandb: Optional[WandbSink] = None
        self.tensorboard: Optional[TensorBoardSink] = None
        self.sinks: list = []
        if not is_main:
            return
        run_dir = Path(run_dir)
        self.console = ConsoleSink(spec, total_steps)
        self.sinks = [self.console, JsonlSink(run_dir / "metrics.jsonl")]
        if spec.logging.wandb.mode != "disabled":
            self.wandb = WandbSink(spec, run_dir)
            self.sinks.append(self.wandb)
        if spec.logging.tensorboard:
            self.tensorboard = TensorBoardSink(spec, run_dir)
            self.sinks.append(self.tensorboard)

    def log(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row)

    def advance(self, step: int) -> None:
        if self.console is not None:
            self.console.advance(step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
