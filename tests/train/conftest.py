import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))  # engines_standin

import pytest


@pytest.fixture(scope="module")
def runtime():
    """A 1-rank gloo process group for in-process engine tests; env and group are restored afterwards."""
    from of_ds.runtime import build_runtime
    from of_ds.spec import EngineSpec

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for k in saved:
        os.environ.pop(k, None)
    rt = build_runtime(EngineSpec(kind="ddp"))
    yield rt
    rt.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
