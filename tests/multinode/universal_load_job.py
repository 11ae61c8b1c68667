"""Load a ds_to_universal conversion of a 2-rank ZeRO-2 checkpoint into a 1-rank engine; write what matched.

Usage: python universal_load_job.py UNIVERSAL_DIR ZERO_CHECKPOINT_DIR OUT_JSON -- <launch/train.py spec args>
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    universal, original, out = (Path(a) for a in sys.argv[1:4])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from of_ds import cli
    from of_ds.runtime import build_runtime
    from of_ds.train.plan import resolve_plan
    from of_ds.train.trainer import build_trainer

    spec = cli.load_spec(cli.parse_args(sys.argv[5:]))
    spec = spec.updated({"run.seed": spec.run.seed + 1})  # a different init: only the checkpoint can make the weights match
    runtime = build_runtime(spec.engine)
    plan = resolve_plan(spec, runtime.world_size, data=False, run_dir=False).with_steps(10)
    ds_config = {**plan.ds_config, "checkpoint": {"load_universal": True}}  # the converted folder this job is given
    engine = build_trainer(dataclasses.replace(plan, deepspeed_json=json.dumps(ds_config)), runtime, data=False).engine
    engine.engine.load_checkpoint(str(universal.parent), tag=universal.name, load_module_strict=False)
    want = get_fp32_state_dict_from_zero_checkpoint(str(original.parent), tag=original.name, exclude_frozen_parameters=True)
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    mismatched = [n for n, p in trainable.items() if n not in want or not torch.equal(p.detach().float(), want[n].float())]
    step = engine.engine.global_steps
    out.write_text(json.dumps({"world_size": runtime.world_size, "trainable": len(trainable), "in_checkpoint": len(want),
                               "mismatched": mismatched, "global_steps": step}))


if __name__ == "__main__":
    main()
