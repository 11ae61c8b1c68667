"""`run(plan, runtime)`: one training run inside a started process group, from building the model to the summary.

`launch/train.py` starts the runtime, resolves the plan (`plan_run`), calls this once and shuts the runtime down; a
driver that runs several specs in one launch (the engine tests) calls it once per plan on the same runtime. While it
runs, the console goes to RUN_DIR/train.log too and SIGTERM/SIGINT stop it at a checkpoint (`stop.py`); however it
ends, rank 0 prints the summary (`summary.py`).
"""

from __future__ import annotations

from ..runtime import Runtime
from ..spec import RunSpec
from .checkpoint import TrainState
from .console import console_log
from .plan import Plan, resolve_plan
from .stop import stop_on_signals


def plan_run(spec: RunSpec, runtime: Runtime) -> Plan:
    """The demo data where the spec names it (rank 0 writes it, every rank waits), then the plan for this world."""
    if spec.run.demo_data and runtime.is_main:
        from ..demo import ensure_demo_data

        ensure_demo_data(spec.run.demo_data)
    runtime.barrier()
    return resolve_plan(spec, runtime.world_size)


def run(plan: Plan, runtime: Runtime) -> TrainState:
    """Train `plan` to its end, or resume it, or stop it on a signal, printing the summary on rank 0; -> the final
    train state."""
    from ..watchdog import maybe_start_watchdog
    from .trainer import build_trainer

    watchdog = maybe_start_watchdog(plan.spec, runtime)  # multi-node: name a dead rank and exit in bounded time
    with console_log(plan.spec.run.run_dir, runtime) as open_log, stop_on_signals() as stop:
        trainer = build_trainer(plan, runtime, on_run_dir_ready=open_log)
        state = trainer.fit(stop, watchdog)
    if watchdog is not None:
        # a clean end only: an error leaves it running, for the excepthook to name a dead peer first
        watchdog.stop()
    return state
