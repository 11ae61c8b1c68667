import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))  # engines_standin

import pytest


@pytest.fixture(scope="module")
def runtime():
    """A 1-rank gloo process group for in-process engine tests; env and group are restored afterwards."""
    import torch.distributed as dist

    from of_ds.runtime import build_runtime
    from of_ds.spec import EngineSpec

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for k in saved:
        os.environ.pop(k, None)
    rt = build_runtime(EngineSpec(kind="ddp"))
    yield rt
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None and dist.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups, stale for the next module's group
    elif dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
