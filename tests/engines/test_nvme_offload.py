"""ZeRO-Infinity on the CPU: parameters and optimizer states offloaded to a disk folder through DeepSpeed's async_io
op, which DeepSpeed builds against libaio on first use (minutes of both cores in a fresh venv). This module runs
last in the session (`async_io` marker, tests/conftest.py) so that a build started beside the suite (.ci/run) has
the suite's idle time to finish in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engines_launch import job, launch_runs, losses
from test_engines_e2e import STEP2, assert_repeats_steps_3_and_4, assert_same_trajectory, workdir  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.async_io]

NVME_SETS = ["engine.zero_stage=3", "engine.offload_param=nvme", "engine.offload_optimizer=nvme"]


def nvme_available() -> bool:
    if Path("/usr/include/libaio.h").is_file():
        return True
    if os.environ.get("CI", "").lower() == "true":  # NVMe offload needs libaio's headers (Debian package libaio-dev)
        pytest.fail("NVMe offload needs libaio's headers (Debian package libaio-dev); CI must provide it (see .ci/run)", pytrace=False)
    return False


@pytest.fixture(scope="module")
def runs(workdir) -> dict:
    """The NVMe run with DDP's beside it, then its resumes in a launch of their own: ZeRO-3 numbers its parameters
    per process and the swap files carry those numbers, so the NVMe run is the first ZeRO-3 engine of its launch and
    its resume the first of the next, as in two fresh processes."""
    if not nvme_available():
        pytest.skip("NVMe offload needs libaio's headers (Debian package libaio-dev)")
    nvme = [*NVME_SETS, f"engine.nvme_path={workdir / 'nvme'}"]
    first = launch_runs(workdir, [job("zero3_nvme", nvme, "zero3.json"), job("ddp", ["engine.kind=ddp"])])
    src, out = workdir / "runs" / "zero3_nvme" / STEP2, workdir / "runs"
    return first | launch_runs(workdir, [
        job("zero3_nvme_resumed", nvme, "zero3.json", copy=(src, out / "zero3_nvme_resumed" / STEP2)),
        job("zero3_nvme_on_cpu", ["engine.zero_stage=3"], "zero3_offload.json", copy=(src, out / "zero3_nvme_on_cpu" / STEP2), expect_error=True),
    ])


def test_zero3_nvme_offload_matches_ddp_and_resumes_exactly(workdir, runs, monkeypatch):
    """Same losses as DDP, the optimizer states on the disk, the export equal to DDP's, and a restart from the step-2
    checkpoint repeats steps 3-4 exactly (DeepSpeed alone loses the Adam moments, the small sub-groups' weights and
    the learning rate: `load_with_nvme_optimizer_state`); resuming it with the optimizer on the CPU is a clear
    error. (A weights-only start reads what the export reads.)"""
    from of_ds.train.export import export_checkpoint

    full = losses(workdir, "zero3_nvme")
    assert_same_trajectory(full, losses(workdir, "ddp"))
    swapped = {p.name.split("-")[0] for p in (workdir / "nvme" / "zero_stage_3" / "optimizer").rglob("*.swp")}
    assert {"exp_avg", "exp_avg_sq"} <= swapped, sorted(swapped)
    # the weights read like any ZeRO-3 checkpoint's (DeepSpeed leaves the swapped ones out of *_optim_states.pt)
    monkeypatch.chdir(workdir)
    exported = torch.load(export_checkpoint(workdir / "runs" / "zero3_nvme", workdir / "zero3_nvme.pt"), map_location="cpu")
    ddp_export = torch.load(export_checkpoint(workdir / "runs" / "ddp", workdir / "ddp.pt"), map_location="cpu")
    assert sorted(exported) == sorted(ddp_export)
    for k in ddp_export:
        torch.testing.assert_close(exported[k], ddp_export[k], rtol=1e-4, atol=1e-5, msg=k)

    assert "resumed from" in runs["zero3_nvme_resumed"]["out"]
    assert_repeats_steps_3_and_4(losses(workdir, "zero3_nvme_resumed"), full)
    assert "saved with the optimizer state on NVMe, but this run keeps it not on NVMe" in runs["zero3_nvme_on_cpu"]["err"]
