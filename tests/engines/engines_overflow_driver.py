"""Under torchrun (2 ranks, through engines_drivers.py), DeepSpeed: at step 2 rank 1 alone gets a NaN gradient from a finite loss. Every
rank must skip that update, whoever decides it:
- MODE=device: ZeRO-2 bf16, the fused optimizer on the device (`found_inf`), no host sync (the default);
- MODE=dropped: ZeRO-2 bf16, DeepSpeed on the host from the global norm, its per-tensor overflow scan dropped
  (optim.fused=false);
- MODE=kept: the same with DeepSpeed's scan and per-tensor fp64 gradient norm kept;
- MODE=z2fp32: ZeRO-2 fp32 (DeepSpeed decides on the host);
- MODE=z0fp32, z0bf16: no ZeRO (of_ds reads the norm on the host, fp32; DeepSpeed's bf16 optimizer decides, bf16).
Writes OUT/MODE-rank{R}.json: the path taken, per-step skipped flags, weight checksums, gradient norm and learning rate
after each step, how many steps Adam took."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from engines_standin import StandInData, tiny_spec_dict  # noqa: E402


def main(tok_dir: str, out: str, mode: str) -> None:
    from of_ds.runtime import build_runtime
    from of_ds.spec import RunSpec
    from of_ds.train.loop import optimizer_step
    from of_ds.train.metrics import Metrics
    from of_ds.train.plan import resolve_plan
    from of_ds.train.trainer import build_trainer

    precision, stage = {"z2fp32": ("fp32", 2), "z0fp32": ("fp32", 0), "z0bf16": ("bf16", 0)}.get(mode, ("bf16", 2))
    optim = {"warmup_steps": 0, "lr": 1e-3, "fused": mode not in ("dropped", "kept")}
    engine_spec = {"kind": "deepspeed", "precision": precision, "zero_stage": stage}
    spec = RunSpec.from_dict(tiny_spec_dict(tok_dir, out, engine=engine_spec, optim=optim))
    rt = build_runtime(spec.engine)
    trainer = build_trainer(resolve_plan(spec, rt.world_size, data=False, run_dir=False).with_steps(4), rt, data=False)
    engine, tok = trainer.engine, trainer.tokenizer
    path = {"device_skip": engine.device_skip, "sync_free_clip": engine.sync_free_clip, "scan_dropped": engine.overflow_scan_dropped,
            "foreach_norm": engine.foreach_grad_norm}
    if mode == "kept":  # DeepSpeed's own methods back: the scan and the per-tensor fp64 norm
        del engine.optimizer.check_overflow
        del engine.optimizer.get_grad_norm_direct
        path.update(scan_dropped=False, foreach_norm=False)
    step = {"n": 0}

    def poison(grad):
        return torch.full_like(grad, float("nan")) if rt.rank == 1 and step["n"] == 1 else grad

    engine.module.perceiver.latents.register_hook(poison)
    data = StandInData(spec, tok, rank=rt.rank)
    data.set_epoch(0)
    batches, metrics = iter(data), Metrics(spec, rt, Path(out) / f"run-{mode}", 4)
    def adam_steps() -> list:
        return sorted({int(s["step"]) for s in engine.inner_optimizer.state.values() if "step" in s})

    before = adam_steps() or [0]  # ZeRO-0's fp16/bf16 wrapper takes one warm-up step at construction
    flags, checksums, lrs, norms = [], [], [], []
    for n in range(3):
        step["n"] = n
        stats = optimizer_step(engine, batches, {"laion": 0.2, "mmc4": 1.0}, rt, metrics)
        flags.append(bool(stats.skipped))
        norms.append(float(stats.grad_norm))
        checksums.append(sum(float(v.double().sum()) for v in engine.module.trainable_state_dict().values()))
        lrs.append(engine.lr)
    result = {"path": path, "skipped": flags, "checksums": checksums, "lrs": lrs, "norms": norms, "adam_steps": [a - before[0] for a in adam_steps()]}
    Path(out, f"{mode}-rank{rt.rank}.json").write_text(json.dumps(result))
