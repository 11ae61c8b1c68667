"""`run(spec, runtime)`: one training run inside a started process group, from building the model to the summary.

`launch/train.py` starts the runtime, calls this once and shuts the runtime down; a driver that runs several specs
in one launch (the engine tests) calls it once per spec on the same runtime. While it runs, the console goes to
RUN_DIR/train.log too and SIGTERM/SIGINT stop it at a checkpoint (`stop.py`); however it ends, rank 0 prints the
summary (`summary.py`).
"""

from __future__ import annotations

import time

from ..runtime import Runtime
from ..spec import RunSpec
from . import resume_policy, session
from .checkpoint import TrainState
from .console import console_log
from .stop import StopFlag, stop_on_signals


def run(spec: RunSpec, runtime: Runtime) -> TrainState:
    """Train `spec` to its end (or resume it, or stop it on a signal), printing the summary on rank 0; -> the final
    train state."""
    from ..watchdog import maybe_start_watchdog

    started = time.time()
    watchdog = maybe_start_watchdog(spec, runtime)  # multi-node: name a dead rank and exit in bounded time
    with console_log(spec.run.run_dir, runtime) as open_log, stop_on_signals() as stop:
        state = _run(spec, runtime, stop, watchdog, started, open_log)
    if watchdog is not None:
        # a clean end only: an error leaves it running, for the excepthook to name a dead peer first
        watchdog.stop()
    return state


def _run(spec: RunSpec, runtime: Runtime, stop: StopFlag, watchdog, started: float, open_log) -> TrainState:
    from ..data import build_train_data
    from ..engines import build_engine
    from ..engines.deepspeed_config import resolve_deepspeed_config, resolved_engine_line
    from ..model import build_flamingo, image_processor_config
    from . import summary
    from .checkpoint import CheckpointManager
    from .loop import train_loop
    from .metrics import Metrics
    from .validate import Validation

    ds_config = None
    if spec.engine.kind == "deepspeed":
        ds_config, spec = resolve_deepspeed_config(spec, runtime.world_size)
        if runtime.is_main:
            print(resolved_engine_line(spec), flush=True)
    if runtime.is_main:
        session.maybe_make_demo_data(spec)
    runtime.barrier()
    run_dir = spec.run.run_dir
    checkpoints = CheckpointManager(run_dir, spec.checkpoint.keep_last, spec.checkpoint.every_n_steps, runtime, spec.checkpoint.keep_best)
    spec = session.prefer_own_checkpoint(spec, checkpoints)  # a requeued command continues its run
    resume_path = session.find_resume_point(spec, checkpoints)
    saved_spec = resume_policy.before_build(spec, resume_path, runtime)  # run dir; a resume's spec diff
    open_log()  # the run dir is settled: train.log goes to this run's
    session.seed_everything(spec.run.seed)  # after the demo data: the model's init is the seed's alone
    model, _, tokenizer = build_flamingo(spec.model)
    data = build_train_data(spec, tokenizer, image_processor_config(model), runtime, pin_memory=runtime.device.type == "cuda")
    total_steps = session.total_optimizer_steps(spec, data.steps_per_epoch)
    session.load_start_weights(model, resume_path, spec)  # weights only: before the engine wraps the model
    universal = session.universal_resume(resume_path, spec, ds_config, runtime)  # ZeRO saved by another number of ranks
    engine = build_engine(model, spec, runtime, total_steps, ds_config)
    state = session.resume(engine, data, checkpoints, resume_path, spec, runtime, universal)
    resume_policy.apply_schedule(engine, spec, saved_spec, state, total_steps, data.steps_per_epoch, runtime)
    metrics = Metrics(spec, runtime, run_dir, total_steps, session.step_flops(spec) if runtime.device.type == "cuda" else None)

    def report(stopped: str, detail: str, drops: dict, drops_of: str = "rank 0") -> None:
        if runtime.is_main:
            summary.report(summary.build_summary(spec, checkpoints, state, total_steps, stopped=stopped, detail=detail,
                                                 start_step=start_step, started=started, drops=drops, drops_of=drops_of), run_dir)

    start_step = state.step
    validation = Validation.maybe(spec, runtime, tokenizer, image_processor_config(model), metrics, total_steps)
    if watchdog is not None:  # a stall: summarise what rank 0 knows before the watchdog ends the process
        die = watchdog.on_failure

        def on_stall(why: str) -> None:
            try:
                report("stall", why, data.drop_counts())
            finally:
                die(why)

        watchdog.on_failure = on_stall
    try:
        train_loop(engine, data, spec, runtime, checkpoints, metrics, state, total_steps, stop, validation)  # updates `state`
    except BaseException as e:
        metrics.close()
        interrupted = isinstance(e, KeyboardInterrupt)
        report("signal" if interrupted else "error", "interrupted mid-step: no checkpoint" if interrupted else f"{type(e).__name__}: {e}",
               data.drop_counts())
        raise
    metrics.close()
    report(*summary.stop_reason(spec, state, total_steps, stop.signal, stop.agreed),
           summary.sum_drops(runtime.gather(data.drop_counts())), "every rank")
    return state
