"""`tools/plot_run RUN_DIR`: loss per dataset, learning rate and throughput of a run, as one PNG.

Reads the run's own `metrics.jsonl` (one JSON object per logged step, written by the loop whatever the wandb
setting), so it works offline and for runs that never used wandb.
"""

from __future__ import annotations

import argparse
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
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and v == v:  # skip NaN
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def loss_keys(rows: list[dict]) -> list[str]:
    """Keys holding losses: `loss` and one `loss/<dataset>` (or `loss_<dataset>`) per dataset."""
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith(("loss/", "loss_"))})
    return keys


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
    for key in loss_keys(rows):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, label=key, lw=2 if key == "loss" else 1.3)
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

    fig.suptitle(f"{run_dir.name}: {len(rows)} logged steps, last step {rows[-1]['step']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
