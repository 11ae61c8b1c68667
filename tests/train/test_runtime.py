import torch.distributed as dist

from of_ds.runtime import build_runtime
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
