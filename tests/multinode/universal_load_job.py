"""Load a ds_to_universal conversion of a 2-rank ZeRO-2 checkpoint into a 1-rank engine; write what matched.

Usage: python universal_load_job.py UNIVERSAL_DIR ZERO_CHECKPOINT_DIR OUT_JSON -- <launch/train.py spec args>
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    universal, original, out = (Path(a) for a in sys.argv[1:4])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from of_ds.engines.deepspeed_config import resolve_deepspeed_config
    from of_ds.engines.deepspeed_engine import DeepSpeedEngine
    from of_ds.model import build_flamingo
    from of_ds.runtime import build_runtime
    from of_ds.train import session

    spec = session.load_spec(session.parse_args(sys.argv[5:]))
    runtime = build_runtime(spec.engine)
    ds_config, spec = resolve_deepspeed_config(spec, runtime.world_size)
    ds_config["checkpoint"] = {"load_universal": True}
    session.seed_everything(spec.run.seed + 1)  # different init: only the checkpoint can make the weights match
    model, _, _ = build_flamingo(spec.model)
    engine = DeepSpeedEngine(model, spec, runtime, ds_config, total_steps=10)
    engine.engine.load_checkpoint(str(universal.parent), tag=universal.name, load_module_strict=False)
    want = get_fp32_state_dict_from_zero_checkpoint(str(original.parent), tag=original.name, exclude_frozen_parameters=True)
    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    mismatched = [n for n, p in trainable.items() if n not in want or not torch.equal(p.detach().float(), want[n].float())]
    step = engine.engine.global_steps
    out.write_text(json.dumps({"world_size": runtime.world_size, "trainable": len(trainable), "in_checkpoint": len(want),
                               "mismatched": mismatched, "global_steps": step}))


if __name__ == "__main__":
    main()
