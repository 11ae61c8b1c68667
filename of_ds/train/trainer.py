"""`build_trainer(plan, runtime) -> Trainer`: the one start-up path, in order: the run dir, the model, its training
features and the engine, the data, the starting point (weights, optimizer, step, loader positions), the schedule,
metrics and validation. `Trainer.fit()` runs the loop and the summary.

`of_ds.train.run` (launch/train.py), `tools/bench_step` (`data=False`: its own batches) and the test drivers build
through it; the dry run prints the plan without building anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..runtime import Runtime, seed_everything
from . import resume_policy
from .checkpoint import CheckpointManager, TrainState
from .plan import Plan
from .stop import StopFlag


def _nothing() -> None:
    return None


@dataclass
class Trainer:
    """What `build_trainer` built. `data`, `metrics` and `validation` are None when built with `data=False`."""

    plan: Plan
    runtime: Runtime
    model: Any
    tokenizer: Any
    image_config: Any
    engine: Any
    checkpoints: CheckpointManager
    state: TrainState = field(default_factory=TrainState)
    data: Any = None
    metrics: Any = None
    validation: Any = None
    started: float = field(default_factory=time.time)

    @property
    def spec(self):
        return self.plan.spec

    def fit(self, stop: Optional[StopFlag] = None, watchdog=None) -> TrainState:
        """Train to the plan's end (or a stop), then print and write the summary on rank 0 however it ended;
        -> the final train state (also `self.state`)."""
        from . import summary
        from .loop import train_loop

        spec, runtime, data, state = self.plan.spec, self.runtime, self.data, self.state
        total, start_step = self.plan.total_steps, state.step
        stop = stop if stop is not None else StopFlag()

        def report(stopped: str, detail: str, drops: dict, drops_of: str = "rank 0") -> None:
            if runtime.is_main:
                summary.report(summary.build_summary(spec, self.checkpoints, state, total, stopped=stopped, detail=detail,
                                                     start_step=start_step, started=self.started, drops=drops, drops_of=drops_of),
                               spec.run.run_dir)

        if watchdog is not None:  # a stall: summarise what rank 0 knows before the watchdog ends the process
            die = watchdog.on_failure

            def on_stall(why: str) -> None:
                try:
                    report("stall", why, data.drop_counts())
                finally:
                    die(why)

            watchdog.on_failure = on_stall
        try:
            train_loop(self.engine, data, spec, runtime, self.checkpoints, self.metrics, state, total, stop, self.validation)
        except BaseException as e:
            self.metrics.close()
            interrupted = isinstance(e, KeyboardInterrupt)
            report("signal" if interrupted else "error", "interrupted mid-step: no checkpoint" if interrupted else f"{type(e).__name__}: {e}",
                   data.drop_counts())
            raise
        self.metrics.close()
        report(*summary.stop_reason(spec, state, total, stop.signal, stop.agreed),
               summary.sum_drops(runtime.gather(data.drop_counts())), "every rank")
        return state


def build_trainer(plan: Plan, runtime: Runtime, *, data: bool = True, on_run_dir_ready: Callable[[], None] = _nothing,
                  loader: Optional[Callable[[Any], Any]] = None) -> Trainer:
    """Build everything `plan` describes on this rank (collective: every rank calls it). `data=False` builds the
    model and engine only (no run dir, loader, resume, metrics): for benchmarks and drivers that feed their own
    batches (`plan.with_steps(n)` gives such a plan its step budget). `on_run_dir_ready`: called once the run dir is
    settled (moved aside or checked), before anything is built (`console_log` opens train.log there). `loader`:
    tokenizer -> a loader to use instead of the spec's shards (test drivers' stand-in data)."""
    from ..engines import build_engine
    from ..model import build_flamingo, image_processor_config
    from .restore import load_start_weights

    started, spec = time.time(), plan.spec
    if plan.total_steps is None:
        raise ValueError("build_trainer: the plan has no step budget (resolved with data=False); use plan.with_steps(n)")
    checkpoints = CheckpointManager(spec.run.run_dir, spec.checkpoint.keep_last, spec.checkpoint.every_n_steps, runtime,
                                    spec.checkpoint.keep_best)
    if data:
        resume_policy.prepare_run_dir(spec, plan.resume.path, runtime)  # collective: another run's dir is refused or moved
        on_run_dir_ready()
    if runtime.is_main:
        if spec.engine.kind == "deepspeed":
            from ..engines.deepspeed_config import resolved_engine_line

            print(resolved_engine_line(spec), flush=True)
        for note in plan.notes:
            print(note, flush=True)
        print(plan.describe(), flush=True)
    seed_everything(spec.run.seed)  # after the demo data: the model's init is the seed's alone
    model, _, tokenizer = build_flamingo(spec.model)
    image_config = image_processor_config(model)
    load_start_weights(model, plan.resume, spec)  # weights only: before the engine wraps the model
    engine = build_engine(model, spec, runtime, plan.total_steps, plan.ds_config)
    trainer = Trainer(plan, runtime, model, tokenizer, image_config, engine, checkpoints, started=started)
    if not data:
        return trainer
    _build_training_side(trainer, loader)
    return trainer


def _build_training_side(t: Trainer, loader: Optional[Callable[[Any], Any]]) -> None:
    """The loader, the starting point, the schedule, metrics and validation of a full trainer."""
    from ..data import build_train_data
    from .metrics import Metrics
    from .restore import restore
    from .validate import Validation

    plan, spec, runtime = t.plan, t.plan.spec, t.runtime
    if loader is not None:
        t.data = loader(t.tokenizer)
    else:
        t.data = build_train_data(spec, t.tokenizer, t.image_config, runtime, pin_memory=runtime.device.type == "cuda")
    if loader is None and t.data.steps_per_epoch != plan.micro_steps_per_epoch:  # one computation of the epoch
        raise AssertionError(f"the loader's epoch ({t.data.steps_per_epoch} micro-steps) is not the plan's ({plan.micro_steps_per_epoch})")
    t.state = restore(t.engine, t.data, t.checkpoints, plan.resume, spec, runtime)
    resume_policy.apply_schedule(t.engine, spec, plan.resume.saved_spec, t.state, plan.total_steps, t.data.steps_per_epoch, runtime)
    t.metrics = Metrics(spec, runtime, spec.run.run_dir, plan.total_steps, step_flops(spec) if runtime.device.type == "cuda" else None)
    t.validation = Validation.maybe(spec, runtime, t.tokenizer, t.image_config, t.metrics, plan.total_steps)


def step_flops(spec) -> Optional[float]:
    """FLOPs of one micro-step on one rank, counted on a meta copy of the model; None if counting fails."""
    try:
        from ..model import build_flamingo
        from ..model.flops import batch_shapes, count_step_flops
        from ..model.vision import tower_image_size

        meta, _, _ = build_flamingo(spec.model, meta=True)
        return float(count_step_flops(meta, batch_shapes(spec, tower_image_size(meta))))
    except Exception as e:  # noqa: BLE001 - the estimate is optional; say why it is missing
        print(f"[of_ds] FLOP count unavailable ({type(e).__name__}: {e}); MFU will not be logged", flush=True)
        return None
