"""`run(spec, runtime)`: one training run inside a started process group, from building the model to the summary.

`launch/train.py` starts the runtime, calls this once and shuts the runtime down; a driver that runs several specs
in one launch (the engine tests) calls it once per spec on the same runtime.
"""

from __future__ import annotations

from ..runtime import Runtime
from ..spec import RunSpec
from . import session
from .checkpoint import TrainState


def run(spec: RunSpec, runtime: Runtime) -> TrainState:
    """Train `spec` to its end (or resume it), printing the summary on rank 0; -> the final train state."""
    from ..data import build_train_data
    from ..engines import build_engine
    from ..engines.deepspeed_config import resolve_deepspeed_config, resolved_engine_line
    from ..watchdog import maybe_start_watchdog
    from ..model import build_flamingo, image_processor_config
    from .checkpoint import CheckpointManager
    from .loop import train_loop
    from .metrics import Metrics
    from .validate import Validation

    watchdog = maybe_start_watchdog(spec, runtime)  # multi-node: name a dead rank and exit in bounded time
    ds_config = None
    if spec.engine.kind == "deepspeed":
        ds_config, spec = resolve_deepspeed_config(spec, runtime.world_size)
        if runtime.is_main:
            print(resolved_engine_line(spec), flush=True)
    if runtime.is_main:
        session.maybe_make_demo_data(spec)
    runtime.barrier()
    session.seed_everything(spec.run.seed)  # after the demo data: the model's init is the seed's alone
    model, _, tokenizer = build_flamingo(spec.model)
    data = build_train_data(spec, tokenizer, image_processor_config(model), runtime, pin_memory=runtime.device.type == "cuda")
    total_steps = session.total_optimizer_steps(spec, data.steps_per_epoch)
    run_dir = spec.run.run_dir
    checkpoints = CheckpointManager(run_dir, spec.checkpoint.keep_last, spec.checkpoint.every_n_steps, runtime, spec.checkpoint.keep_best)
    resume_path = session.find_resume_point(spec, checkpoints)
    session.load_start_weights(model, resume_path, spec)  # weights only: before the engine wraps the model
    universal = session.universal_resume(resume_path, spec, ds_config, runtime)  # ZeRO saved by another number of ranks
    engine = build_engine(model, spec, runtime, total_steps, ds_config)
    state = session.resume(engine, data, checkpoints, resume_path, spec, runtime, universal)
    metrics = Metrics(spec, runtime, run_dir, total_steps, session.step_flops(spec) if runtime.device.type == "cuda" else None)
    validation = Validation.maybe(spec, runtime, tokenizer, image_processor_config(model), metrics, total_steps)
    try:
        state = train_loop(engine, data, spec, runtime, checkpoints, metrics, state, total_steps, validation)
    finally:
        metrics.close()
    if runtime.is_main:
        print(session.summary(spec, run_dir, checkpoints, state), flush=True)
    if watchdog is not None:
        # a clean end only: an error leaves it running, for the excepthook to name a dead peer first
        watchdog.stop()
    return state
