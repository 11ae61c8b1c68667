"""DeepSpeed ZeRO-1/2 on one rank: `sync_free_ds_config` turns `reduce_scatter` off there. The gradients, and so the
weights, are the same bits; the byte counter counts 8 bytes per trainable parameter less in the backward: the
division of every gradient bucket by the world size (1), and a copy of a bucket onto itself, which torch skips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines_launch import env

DRIVER = Path(__file__).resolve().parent / "one_rank_driver.py"


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    """Each stage with our config and with DeepSpeed's default, in one process."""
    modes = ["1", "1:keep", "2", "2:keep"]
    proc = subprocess.run([sys.executable, str(DRIVER), *modes], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == modes
    return {r["mode"]: r for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_one_rank_reduces_without_reduce_scatter_and_the_same_bits(runs, stage):
    ours, default = runs[str(stage)], runs[f"{stage}:keep"]
    assert (ours["reduce_scatter"], default["reduce_scatter"]) == (False, True)
    assert ours["losses"] == default["losses"]
    assert len(set(ours["losses"][::2])) == 3  # the weights moved: three different losses on the same batch
    assert ours["weights_sha256"] == default["weights_sha256"]
    saved = default["backward_bytes_per_trainable"] - ours["backward_bytes_per_trainable"]
    assert saved == pytest.approx(8.0, abs=0.1)
