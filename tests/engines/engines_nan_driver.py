"""Under torchrun (2 ranks, through engines_drivers.py): rank 1 alone gets a NaN image at micro-step 2; every rank
must skip that update. Writes OUT/KIND-rank{R}.json (`:` as `-`) with the per-step skipped flags and a checksum of the trainable weights."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engines_standin import StandInData, tiny_spec_dict  # noqa: E402


class NaNOnRank1(StandInData):
    def __iter__(self):
        for batch in super().__iter__():
            if self.rank == 1 and self.index == 2:
                batch["mmc4"]["pixel_values"][0] = float("nan")
            yield batch


def main(tok_dir: str, out: str, kind: str) -> None:
    kind, _, precision = kind.partition(":")  # e.g. deepspeed:bf16 (ZeRO-2 bf16 skips on the device)
    from of_ds.runtime import build_runtime
    from of_ds.spec import RunSpec
    from of_ds.train.loop import optimizer_step
    from of_ds.train.metrics import Metrics
    from of_ds.train.plan import resolve_plan
    from of_ds.train.trainer import build_trainer

    spec = RunSpec.from_dict(tiny_spec_dict(tok_dir, out, engine={"kind": kind, "precision": precision or "fp32", "zero_stage": 2}))
    rt = build_runtime(spec.engine)
    trainer = build_trainer(resolve_plan(spec, rt.world_size, data=False, run_dir=False).with_steps(4), rt, data=False)
    engine, tok = trainer.engine, trainer.tokenizer
    data = NaNOnRank1(spec, tok, rank=rt.rank)
    data.set_epoch(0)
    batches, metrics = iter(data), Metrics(spec, rt, Path(out) / "run", 4)
    flags = [bool(optimizer_step(engine, batches, {"laion": 0.2, "mmc4": 1.0}, rt, metrics).skipped) for _ in range(3)]
    checksum = sum(float(v.double().sum()) for v in engine.module.trainable_state_dict().values()) if kind != "deepspeed" or engine.zero_stage < 3 else None
    Path(out, f"{kind}{'-' + precision if precision else ''}-rank{rt.rank}.json").write_text(json.dumps({"skipped": flags, "checksum": checksum}))
