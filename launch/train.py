#!/usr/bin/env python3
"""Train from a run spec. `deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json --spec S.yaml`,
`torchrun --nproc_per_node N launch/train.py --spec S.yaml --set engine.kind=ddp|fsdp`, or plain `python`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from of_ds.train import session  # noqa: E402


def main(argv=None) -> int:
    args = session.parse_args(argv)
    spec = session.load_spec(args)
    if args.dry_run:
        return session.dry_run_main(spec, args)
    from of_ds.data import build_train_data
    from of_ds.engines import build_engine
    from of_ds.engines.deepspeed_config import resolve_deepspeed_config
    from of_ds.engines.watchdog import maybe_start_watchdog
    from of_ds.model import build_flamingo, image_processor_config
    from of_ds.runtime import build_runtime
    from of_ds.train.checkpoint import CheckpointManager
    from of_ds.train.loop import train_loop
    from of_ds.train.metrics import Metrics

    runtime = build_runtime(spec.engine)
    watchdog = maybe_start_watchdog(spec, runtime)  # multi-node: name a dead rank and exit in bounded time
    ds_config = None
    if spec.engine.kind == "deepspeed":
        ds_config, spec = resolve_deepspeed_config(spec, runtime.world_size)
    if runtime.is_main:
        session.maybe_make_demo_data(spec)
    runtime.barrier()
    session.seed_everything(spec.run.seed)  # after the demo data: the model's init is the seed's alone
    model, _, tokenizer = build_flamingo(spec.model)
    data = build_train_data(spec, tokenizer, image_processor_config(model), runtime, pin_memory=runtime.device.type == "cuda")
    total_steps = session.total_optimizer_steps(spec, data.steps_per_epoch)
    run_dir = spec.run.run_dir
    checkpoints = CheckpointManager(run_dir, spec.checkpoint.keep_last, spec.checkpoint.every_n_steps, runtime)
    resume_path = session.find_resume_point(spec, checkpoints)
    session.load_start_weights(model, resume_path, spec)  # weights only: before the engine wraps the model
    universal = session.universal_resume(resume_path, spec, ds_config, runtime)  # ZeRO saved by another number of ranks
    engine = build_engine(model, spec, runtime, total_steps, ds_config)
    state = session.resume(engine, data, checkpoints, resume_path, spec, runtime, universal)
    metrics = Metrics(spec, runtime, run_dir, total_steps, session.step_flops(spec) if runtime.device.type == "cuda" else None)
    try:
        state = train_loop(engine, data, spec, runtime, checkpoints, metrics, state, total_steps)
    finally:
        metrics.close()
    if runtime.is_main:
        print(session.summary(spec, run_dir, checkpoints, state), flush=True)
    if watchdog is not None:
        watchdog.stop()  # before the barrier: no rank's watchdog outlives the store it beats into
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    from of_ds.spec import SpecError

    try:
        sys.exit(main())
    except SpecError as e:  # a spec/config problem: the message names the fields, a traceback adds nothing
        print(f"launch/train.py: {e}", file=sys.stderr)
        sys.exit(2)
