"""The end-of-run summary: printed by rank 0 and written to `RUN_DIR/summary.json` when a run ends, however it ends.

Why it stopped (max_steps, epochs, signal, error, stall), steps done and skipped, this start's steps and wall time,
the final and best logged loss per dataset (read back from metrics.jsonl, so the two agree), samples and tokens
seen per dataset, drops by dataset and reason, and the run's paths. It makes no collective call: a run that ends
on an error or a stall summarises what this rank knows.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from ..spec import RunSpec
from .checkpoint import CheckpointManager, TrainState
from .console import TRAIN_LOG
from .loggers import TENSORBOARD, WANDB_ID, format_eta

SUMMARY = "summary.json"


def logged_losses(metrics_path: Path, last_step: int) -> dict[str, dict]:
    """Per loss key (training: "loss", "loss/<dataset>"; validation: "val/loss", "val/loss/<dataset>"): the final
    and best logged value and their steps, over the rows of steps up to `last_step` (a resumed run's re-logged
    steps count once: the later row)."""
    kinds: dict[str, dict[int, dict]] = {"loss": {}, "val/loss": {}}  # training rows, validation rows, by step
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                kind = next((k for k in kinds if k in row), None)
                if kind is not None and row.get("step", math.inf) <= last_step:
                    kinds[kind][row["step"]] = row
    out: dict[str, dict] = {}
    for kind, rows in kinds.items():
        for step in sorted(rows):
            for k, v in rows[step].items():
                if k != kind and not k.startswith(kind + "/") or not isinstance(v, (int, float)):
                    continue
                entry = out.setdefault(k, {"final": v, "final_step": step, "best": None, "best_step": None})
                entry.update(final=v, final_step=step)
                if math.isfinite(v) and (entry["best"] is None or v < entry["best"]):
                    entry.update(best=v, best_step=step)
    return out


def sum_drops(per_rank: list[dict]) -> dict[str, dict[str, int]]:
    """dataset -> reason -> count, summed over ranks' `drop_counts()`."""
    out: dict[str, dict[str, int]] = {}
    for counts in per_rank:
        for name, reasons in counts.items():
            for reason, n in reasons.items():
                out.setdefault(name, {})[reason] = out.setdefault(name, {}).get(reason, 0) + n
    return out


def build_summary(spec: RunSpec, checkpoints: CheckpointManager, state: TrainState, total_steps: int, *,
                  stopped: str, detail: str, start_step: int, started: float, drops: dict, drops_of: str) -> dict:
    """`stopped`: max_steps | epochs | signal | error | stall; `detail` says more; `started`: time.time() at this
    start; `drops_of`: whose drop counts `drops` holds ("every rank", "rank 0")."""
    run_dir = Path(spec.run.run_dir)
    latest = checkpoints.latest()
    paths = {"run_dir": run_dir.resolve(), "checkpoints": checkpoints.root.resolve(), "latest_checkpoint": latest and latest.resolve(),
             "metrics": (run_dir / "metrics.jsonl").resolve(), "train_log": (run_dir / TRAIN_LOG).resolve()}
    if (run_dir / "samples").is_dir():
        paths["samples"] = (run_dir / "samples").resolve()
    best = checkpoints.root / "best"
    if spec.checkpoint.keep_best and best.is_file():
        paths["best_checkpoint"] = (checkpoints.root / best.read_text().strip()).resolve()
    if spec.logging.tensorboard:
        paths["tensorboard"] = (run_dir / TENSORBOARD).resolve()
    if spec.logging.wandb.mode != "disabled":
        paths["wandb"] = (run_dir / "wandb").resolve()
        paths["wandb_id"] = (run_dir / WANDB_ID).read_text().strip() if (run_dir / WANDB_ID).is_file() else None
    return {
        "stopped": stopped, "detail": detail,
        "step": state.step, "total_steps": total_steps, "epoch": state.epoch, "skipped_steps": state.skipped_steps,
        "this_start": {"from_step": start_step, "steps": state.step - start_step, "wall_s": round(time.time() - started, 3)},
        "loss": logged_losses(run_dir / "metrics.jsonl", state.step),
        "samples_seen": dict(state.samples_seen_by_dataset), "tokens_seen": dict(state.tokens_seen_by_dataset),
        "dropped": drops, "dropped_counted_on": drops_of,
        "paths": {k: (str(v) if v is not None else None) for k, v in paths.items()},
    }


def format_summary(s: dict) -> str:
    why = {"max_steps": "run.max_steps reached", "epochs": "run.epochs done"}.get(s["stopped"], s["stopped"])
    lines = [
        f"stopped:     {why}" + (f" ({s['detail']})" if s["detail"] else ""),
        f"steps:       {s['step']} of {s['total_steps']} done ({s['skipped_steps']} skipped), epoch {s['epoch']}; this start: "
        f"{s['this_start']['steps']} step(s) from step {s['this_start']['from_step']} in {format_eta(s['this_start']['wall_s'])}",
    ]
    for key, e in s["loss"].items():
        best = f"best {e['best']:.4f} (step {e['best_step']})" if e["best"] is not None else "best -"
        name = {"loss": "loss", "val/loss": "val loss"}.get(key) or (
            f"{key.removeprefix('val/loss/')} val" if key.startswith("val/") else f"{key.removeprefix('loss/')} loss")
        lines.append(f"{name}:".ljust(13)
                     + f"final {e['final']:.4f} (step {e['final_step']}), {best}")
    for name in s["samples_seen"]:
        lines.append(f"{name} seen:".ljust(13) + f"{s['samples_seen'][name]:,} samples, {s['tokens_seen'].get(name, 0):,} tokens")
    drops = "; ".join(f"{name}: " + (", ".join(f"{r} {n:,}" for r, n in reasons.items()) or "none")
                      for name, reasons in s["dropped"].items()) or "none"
    lines.append(f"dropped:     {drops} ({s['dropped_counted_on']})")
    p = s["paths"]
    lines += [
        f"run dir:     {p['run_dir']}",
        f"checkpoints: {p['checkpoints']} (latest: {Path(p['latest_checkpoint']).name if p['latest_checkpoint'] else 'none'})",
        f"metrics:     {p['metrics']}  (plot: tools/plot_run {p['run_dir']})",
        f"console log: {p['train_log']}",
    ]
    if "best_checkpoint" in p:
        lines.append(f"best:        {p['best_checkpoint']} (lowest val/loss; checkpoint.keep_best)")
    if "samples" in p:
        lines.append(f"samples:     {p['samples']}  (page: tools/plot_run {p['run_dir']} -> samples.html)")
    if "tensorboard" in p:
        lines.append(f"tensorboard: tensorboard --logdir {p['tensorboard']}")
    if "wandb" in p:
        lines.append(f"wandb:       {p['wandb']} (run id {p['wandb_id']})")
    lines.append(f"export:      tools/export_checkpoint {p['run_dir']} {p['run_dir']}/export.pt")
    return "\n".join(f"[of_ds] {line}" for line in lines)


def report(summary: dict, run_dir: Path) -> None:
    """Print the summary and write it to RUN_DIR/summary.json (rank 0)."""
    path = Path(run_dir) / SUMMARY
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)
    print(format_summary(summary) + f"\n[of_ds] summary:     {path.resolve()}", flush=True)


def stop_reason(spec: RunSpec, state: TrainState, total_steps: int, signal_name: Optional[str], agreed: bool) -> tuple[str, str]:
    """(stopped, detail) of a run that left the loop without an error."""
    if agreed:
        return "signal", f"{signal_name or 'received by another rank'}; checkpoint at step {state.step}"
    if spec.run.max_steps and total_steps == spec.run.max_steps:
        return "max_steps", f"run.max_steps={spec.run.max_steps}"
    return "epochs", f"run.epochs={spec.run.epochs}"
