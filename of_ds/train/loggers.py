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
        if "loss" in row and "lr" in row:
            line = self.training_line(row)
        elif "val/loss" in row:
            line = self.validation_line(row)
        else:
            line = self.plain_line(row)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def plain_line(self, row: dict) -> str:
        parts = [f"step {row['step']}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in flat_numbers(row).items() if k != "step"]
        return " | ".join(parts)

    def validation_line(self, row: dict) -> str:
        """`step N/T | val loss L | <dataset> L (ppl P) | ... | Ts`: a row of train/validate.py."""
        parts = [f"step {row['step']}/{self.total_steps}", f"val loss {row['val/loss']:.4f}"]
        names = [k.split("/", 2)[2] for k in row if k.startswith("val/loss/")]
        parts += [f"{n} {row[f'val/loss/{n}']:.4f} (ppl {row[f'val/ppl/{n}']:.2f})" for n in names]
        if "eval_s" in row:
            parts.append(f"{row['eval_s']:.1f}s")
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

    def log_samples(self, step: int, records: list[dict], folder: Path) -> None:
        """A `samples` table: each prompt's (last) image, prompt, reference and output."""
        import wandb

        table = wandb.Table(columns=["kind", "image", "prompt", "reference", "output"])
        for r in records:
            table.add_data(r["kind"], wandb.Image(str(folder / r["images"][-1])), r["prompt"], r["reference"], r["output"])
        self._call(self.run.log, {"samples": table}, step=step)

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

    def log_samples(self, step: int, records: list[dict], folder: Path) -> None:
        """Each prompt's (last) image as `samples/<i>`, and a text table of prompts, references and outputs."""
        import numpy as np
        from PIL import Image

        for i, r in enumerate(records):
            with Image.open(folder / r["images"][-1]) as im:
                self.writer.add_image(f"samples/{i}", np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        table = ["| # | kind | prompt | reference | output |", "|---|---|---|---|---|"]
        table += [f"| {i} | {r['kind']} | {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['output'])} |" for i, r in enumerate(records)]
        self.writer.add_text("samples", "\n".join(table), global_step=step)
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

    def log_samples(self, step: int, records: list[dict], folder: Path) -> None:
        """Sample outputs (train/samples.py) to the sinks that show them: wandb, TensorBoard."""
        for sink in (self.wandb, self.tensorboard):
            if sink is not None:
                sink.log_samples(step, records, folder)

    def advance(self, step: int) -> None:
        if self.console is not None:
            self.console.advance(step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
