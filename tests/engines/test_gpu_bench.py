"""`tools/gpu_session.sh` / `tools/gpu_bench.sh` on the CPU (TINY=1: tiny models, one step each): the next GPU
plan runs every variant it names without a failure, and a time budget skips what it cannot fit, so a time-limited
GPU run returns with every line written."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from engines_launch import env

REPO = Path(__file__).resolve().parents[2]
NEXT = ["3b_z2_fused", "traffic_3b", "traffic_9b", "3b_z2_fused_cublaslt", "3b_z2_fused_compile", "3b_z2", "9b_z2_fused",
        "3b_ddp", "9b_z3_ac_x12"]


# `next`'s variants (as gpu_bench.sh names them) in two groups of about equal time on a CPU, run side by side
NEXT_HALVES = (["3b_z2_fused_compile", "9b_z3_ac", "3b_ddp"], ["3b_z2_fused", "traffic", "3b_z2_fused_cublaslt", "3b_z2", "9b_z2_fused"])


def _start(out: Path, budget_s: int, min_variant_s: int = 45, variants: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([str(REPO / "tools" / "gpu_session.sh"), str(out), *variants], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**env(), "TINY": "1", "BUDGET_S": str(budget_s), "MIN_VARIANT_S": str(min_variant_s)})


def _lines(proc: subprocess.Popen, out: Path) -> list[dict]:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]


def _session(out: Path, budget_s: int, min_variant_s: int = 45) -> tuple[list[dict], float]:
    started = time.monotonic()
    lines = _lines(_start(out, budget_s, min_variant_s), out)
    return lines, time.monotonic() - started


def test_only_sync_warnings_count_as_host_syncs():
    """`host_syncs_per_step` counts torch's sync-debug warnings (libc10_cuda's text), not a step's other warnings."""
    from of_ds.perf.bench_step import is_sync_warning

    assert is_sync_warning(UserWarning("called a synchronizing CUDA operation"))
    assert not is_sync_warning(FutureWarning("`torch.distributed._all_gather_base` is a private function and will be deprecated"))
    assert not is_sync_warning(UserWarning("gemm_and_bias error: CUBLAS_STATUS_NOT_SUPPORTED. Will attempt to recover by calling cublas instead."))


@pytest.mark.slow
def test_the_next_plan_runs_every_variant(tmp_path):
    """Every variant of `next`, in two sessions side by side (the CPU has two cores; the order `next` runs them in
    is the budget test's to check)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [_start(out, budget_s=0, variants=tuple(half)) for out, half in zip(outs, NEXT_HALVES)]  # no budget
    lines = [line for proc, out in zip(procs, outs) for line in _lines(proc, out)]
    assert sorted(line["name"] for line in lines) == sorted(NEXT)
    failed = [line["name"] for line in lines if line.get("failed") or line.get("skipped")]
    assert not failed, "\n".join((out / "log.txt").read_text()[-5000:] for out in outs)
    assert all("step_time_s" in line for line in lines if not line["name"].startswith("traffic"))
    assert all(line["projected_ms"]["total"] > 0 for line in lines if line["name"].startswith("traffic"))
    assert {"ops_3b_z2.txt", "ops_3b_z2_fused.txt", "versions.txt", "log.txt"} <= {p.name for p in outs[1].iterdir()}
    assert all("torch" in (out / "versions.txt").read_text() for out in outs)
    # tools/bench_step's line, with and without one pass for both datasets: the same first loss and FLOPs counted,
    # fewer operators dispatched
    by_name = {line["name"]: line for line in lines}
    separate, fused = by_name["3b_z2"], by_name["3b_z2_fused"]
    for row in (separate, fused):
        assert row["step_time_s"] > 0 and row["samples_per_s"] > 0 and row["tflop_per_step"] > 0
        assert row["params_trainable"] < row["params_total"] and row["ops_per_step"] > 100
    assert fused["fuse_datasets"] and not separate["fuse_datasets"]
    assert fused["loss_first"] == pytest.approx(separate["loss_first"], rel=1e-5)
    assert fused["tflop_per_step"] == separate["tflop_per_step"]
    assert fused["ops_per_step"] < 0.8 * separate["ops_per_step"], (fused["ops_per_step"], separate["ops_per_step"])


@pytest.mark.slow
def test_the_budget_skips_what_it_cannot_fit(tmp_path):
    budget, floor = 60, 50  # room for the first tiny variant (10-30 s), after it less than the floor: nothing else starts
    lines, seconds = _session(tmp_path, budget_s=budget, min_variant_s=floor)
    assert [line["name"] for line in lines] == NEXT  # every line written
    assert "step_time_s" in lines[0]
    skipped = [i for i, line in enumerate(lines) if line.get("skipped") == "budget"]
    assert skipped and skipped == list(range(skipped[0], len(NEXT)))  # once skipped, nothing later starts
    assert all(lines[i]["left_s"] < floor for i in skipped)
    assert seconds < budget + 30  # a variant's limit is cut to the budget left (and its kill comes 10 s after)
