"""Several training runs in one launch: `deepspeed --num_gpus N runs_driver.py JOBS_JSON OUT_DIR`.

Each job is what one `launch/train.py` command would run (its argv), here through `of_ds.train.run.run` on one
process group that every job shares, so a test module pays the launcher's and the imports' start-up once instead
of once per run. A job may first copy a step folder of an earlier job (`copy`: [src, dst]) and may be expected to
fail (`expect_error`): its error message is recorded instead. Each job's printed output goes to OUT_DIR/NAME.out,
its error (if any) to OUT_DIR/NAME.err; OUT_DIR/DONE is written once every job ran.
"""

import contextlib
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from of_ds import cli  # noqa: E402
from of_ds.runtime import build_runtime  # noqa: E402
from of_ds.spec import EngineSpec  # noqa: E402
from of_ds.train.run import plan_run, run  # noqa: E402


def main() -> None:
    jobs_path, out_dir = (a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    out = Path(out_dir)
    jobs = json.loads(Path(jobs_path).read_text())
    runtime = build_runtime(EngineSpec(kind="deepspeed"))
    for job in jobs:
        if runtime.is_main and job.get("copy"):
            src, dst = (Path(p) for p in job["copy"])
            shutil.copytree(src, dst)
        runtime.barrier()
        spec = cli.load_spec(cli.parse_args(job["argv"]))
        buffer = open(out / f"{job['name']}.out", "w") if runtime.is_main else open(os.devnull, "w")
        with buffer, contextlib.redirect_stdout(buffer):
            try:
                run(plan_run(spec, runtime), runtime)  # as launch/train.py
            except Exception as e:  # noqa: BLE001 - recorded for the test; an unexpected one fails the launch
                if not job.get("expect_error"):
                    traceback.print_exc()
                    raise
                if runtime.is_main:
                    (out / f"{job['name']}.err").write_text(f"{type(e).__name__}: {e}\n")
        runtime.barrier()
    if runtime.is_main:
        (out / "DONE").write_text("")
    runtime.shutdown()


if __name__ == "__main__":
    main()
