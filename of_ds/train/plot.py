"""`tools/plot_run RUN_DIR`: loss per dataset (training, and validation dashed), learning rate and throughput of a
run, as one PNG; and where the run wrote samples, `RUN_DIR/samples.html`: each sample image with its prompt, its
reference text and the model's output at every evaluation.

Reads the run's own `metrics.jsonl` (one JSON object per logged row, written by the loop whatever the wandb
setting) and `samples/step-*.jsonl`, so it works offline and for runs that never used wandb.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

def read_metrics(path: Path) -> list[dict]:
    """Parse a metrics.jsonl file; a torn last line (run killed mid-write) is ignored."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """`key` by step; a step logged twice (a run resumed from an earlier checkpoint logs its steps again) keeps
    its last value."""
    by_step = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and v == v:  # skip NaN
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_keys(rows: list[dict]) -> list[str]:
    """Keys holding losses: `loss` and one `loss/<dataset>` (or `loss_<dataset>`) per dataset."""
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith(("loss/", "loss_"))})
    return keys


def val_loss_keys(rows: list[dict]) -> list[str]:
    """`val/loss` and one `val/loss/<dataset>` per evaluated dataset."""
    return sorted({k for r in rows for k in r if k == "val/loss" or k.startswith("val/loss/")})


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `RUN_DIR/run.png` (or `out`) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics file (is {run_dir} a run directory?)")
    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics}: no logged steps yet")
    out = Path(out) if out else run_dir / "run.png"

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    colors = {}
    for key in loss_keys(rows):
        xs, ys = _series(rows, key)
        if xs:
            (line,) = ax.plot(xs, ys, label=key, lw=2 if key == "loss" else 1.3)
            colors[key] = line.get_color()
    for key in val_loss_keys(rows):
        xs, ys = _series(rows, key)
        if xs:  # dashed, in its training curve's colour
            ax.plot(xs, ys, "--o", label=key, lw=2 if key == "val/loss" else 1.3, ms=3, color=colors.get(key.removeprefix("val/")))
    ax.set(title="loss", xlabel="optimizer step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    xs, ys = _series(rows, "lr")
    ax.plot(xs, ys, color="tab:orange")
    ax.set(title="learning rate", xlabel="optimizer step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)

    ax = axes[2]
    xs, ys = _series(rows, "samples_per_s")
    ax.plot(xs, ys, color="tab:green")
    ax.set(title="throughput (samples/s)", xlabel="optimizer step", ylim=(0, None))
    ax.grid(alpha=0.3)

    fig.suptitle(f"{run_dir.name}: {sum('loss' in r for r in rows)} logged steps, last step {rows[-1]['step']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def samples_page(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write `RUN_DIR/samples.html` (or `out`) from `RUN_DIR/samples/step-*.jsonl`; None when there are none."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "samples").glob("step-*.jsonl"))
    if not files:
        return None
    by_prompt: dict[tuple, list[dict]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                by_prompt.setdefault((r["kind"], r["key"]), []).append(r)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(run_dir.name)}: samples</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left;vertical-align:top}"
             "img{height:128px;margin-right:4px}section{margin-bottom:2em}</style>",
             f"<h1>{html.escape(run_dir.name)}: greedy outputs over training</h1>"]
    for (kind, key), records in by_prompt.items():
        first = records[0]
        images = "".join(f"<img src='samples/{html.escape(i)}'>" for i in first["images"])
        rows = "".join(f"<tr><td>{r['step']}</td><td>{html.escape(r['output'])}</td></tr>" for r in records)
        parts.append(f"<section><h3>{html.escape(kind)} {html.escape(key)}</h3>{images}"
                     f"<p>prompt: <code>{html.escape(first['prompt'])}</code><br>reference: {html.escape(first['reference'])}</p>"
                     f"<table><tr><th>step</th><th>output</th></tr>{rows}</table></section>")
    out = Path(out) if out else run_dir / "samples.html"
    out.write_text("\n".join(parts) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/run.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_run: {e}", file=sys.stderr)
        return 2
    print(path)
    page = samples_page(args.run_dir)
    if page is not None:
        print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
