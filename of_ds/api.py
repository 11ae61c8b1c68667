"""Training from Python: `of_ds.api.train("launch/specs/demo.yaml", ["run.max_steps=100"])`.

The same path as `launch/train.py` (spec -> preflight -> runtime -> plan -> `build_trainer` -> fit), for notebooks
and scripts; under a launcher (`deepspeed`, `torchrun`) every rank calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from .preflight import preflight
from .runtime import Runtime, build_runtime
from .spec import RunSpec
from .train.checkpoint import TrainState
from .train.run import plan_run, run


def train(spec: Union[RunSpec, str, Path], overrides: Sequence[str] = (), runtime: Optional[Runtime] = None) -> TrainState:
    """Train a spec (a RunSpec, or a YAML path with `--set`-style `overrides`); -> the final train state. Without
    `runtime`, the process group is started here and shut down at the end."""
    if not isinstance(spec, RunSpec):
        spec = RunSpec.from_yaml(spec, list(overrides))
    elif overrides:
        raise ValueError("overrides go with a spec path; a RunSpec is changed with spec.updated({\"optim.lr\": 1e-4})")
    own = runtime is None
    runtime = runtime if runtime is not None else build_runtime(spec.engine)
    try:
        preflight(spec, runtime.world_size)
        return run(plan_run(spec, runtime), runtime)
    finally:
        if own:
            runtime.shutdown()
