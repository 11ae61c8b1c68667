import os

import torch
import torch.distributed as dist

from of_ds.runtime import build_runtime, share_cpu_cores
from of_ds.spec import EngineSpec


def test_shutdown_tears_the_process_group_down(monkeypatch):
    """launch/train.py ends with `Runtime.shutdown`: a barrier, then no process group left (DeepSpeed's too)."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    rt = build_runtime(EngineSpec(kind="deepspeed"))
    try:
        assert dist.is_initialized() and rt.distributed
    finally:
        rt.shutdown()
    assert not dist.is_initialized() and not rt.distributed
    rt.shutdown()  # idempotent
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb is not None and not ds_comm.cdb.is_initialized()


def test_which_checkpoints_need_the_universal_format(tmp_path):
    """ZeRO-1/2/3 partitions from another number of ranks: converted; same ranks, ZeRO-0, DDP: as they are; across
    ZeRO-3, ZeRO-1/2 and ZeRO-0: a clear error."""
    import json

    import pytest

    from of_ds.train.checkpoint import CheckpointError, needs_universal

    def saved(engine, stage, world):
        (tmp_path / "meta.json").write_text(json.dumps({"engine": engine, "zero_stage": stage, "world_size": world}))
        return tmp_path

    assert needs_universal(saved("deepspeed", 2, 2), 2, 1) and needs_universal(saved("deepspeed", 3, 8), 3, 4)
    assert needs_universal(saved("deepspeed", 1, 2), 2, 4)  # ZeRO-1 and 2 share their partition layout
    assert not needs_universal(saved("deepspeed", 2, 2), 2, 2)
    assert not needs_universal(saved("deepspeed", 0, 2), 0, 1) and not needs_universal(saved("ddp", None, 2), 2, 1)
    with pytest.raises(CheckpointError, match="saved under ZeRO stage 2 and this run uses stage 3"):
        needs_universal(saved("deepspeed", 2, 2), 3, 2)
    for stages in ((2, 0), (0, 1), (3, 0)):  # ZeRO-0 keeps a whole optimizer state, ZeRO-1-3 partitions
        with pytest.raises(CheckpointError, match=f"saved under ZeRO stage {stages[0]} and this run uses stage {stages[1]}"):
            needs_universal(saved("deepspeed", stages[0], 2), stages[1], 2)
    (tmp_path / "offloaded_tensors").mkdir()  # the optimizer state on NVMe: its swap files do not convert
    assert not needs_universal(saved("deepspeed", 3, 2), 3, 2)
    with pytest.raises(CheckpointError, match="saved by 2 ranks with the optimizer state on NVMe"):
        needs_universal(saved("deepspeed", 3, 2), 3, 1)


def test_ranks_of_one_machine_share_its_cores(monkeypatch):
    """N local ranks (deepspeed's LOCAL_SIZE, torchrun's LOCAL_WORLD_SIZE) take a core count each of cores // N for
    torch's threads; OMP_NUM_THREADS, where set, and a lone rank keep torch's own choice. (The demo's ranks, run as the
    README runs them, record theirs: tests/e2e/test_readme.py.)"""
    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    for k in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(k, raising=False)
    try:
        assert share_cpu_cores() is None and torch.get_num_threads() == before
        monkeypatch.setenv("LOCAL_SIZE", "2")
        assert share_cpu_cores() == torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
        assert share_cpu_cores() == torch.get_num_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert share_cpu_cores() is None and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
