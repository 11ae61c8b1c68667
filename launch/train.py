#!/usr/bin/env python3
"""Train from a run spec. `deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json --spec S.yaml`,
`torchrun --nproc_per_node N launch/train.py --spec S.yaml --set engine.kind=ddp|fsdp`, or plain `python`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from of_ds import cli  # noqa: E402
from of_ds.preflight import preflight  # noqa: E402
from of_ds.spec import SpecError  # noqa: E402


def main(argv=None) -> int:
    args = cli.parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:  # before any process group, model or run dir: the spec, then every path it names (one line per problem)
        spec = cli.load_spec(args)
        if args.preflight:
            preflight(spec, cli.world_size_of(args))
        if args.dry_run:
            return cli.dry_run_main(spec, args)
    except SpecError as e:
        if main_rank:  # every rank checks and exits; one says why
            print(f"launch/train.py: {e}", file=sys.stderr, flush=True)
        return 2
    from of_ds.runtime import build_runtime
    from of_ds.train.run import plan_run, run

    runtime = build_runtime(spec.engine)
    try:
        run(plan_run(spec, runtime), runtime)  # the plan: engine settings, steps, where it starts (resolved once)
    except SpecError as e:  # a resume's refused spec changes: every rank finds them, one says which
        if runtime.is_main:
            print(f"launch/train.py: {e}", file=sys.stderr, flush=True)
        runtime.shutdown()
        return 2
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpecError as e:  # a spec/config problem: the message names the fields, a traceback adds nothing
        print(f"launch/train.py: {e}", file=sys.stderr)
        sys.exit(2)
