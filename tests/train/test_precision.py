"""DeepSpeed precisions in one process: fp16 loss scaling with skipped steps counted, bf16 and torch_autocast
(amp_bf16) losses close to fp32's."""

from __future__ import annotations

import json

import pytest
import torch

from engines_standin import StandInData, tiny_spec_dict
from of_ds.spec import RunSpec


def run(tiny_tokenizer_dir, runtime, tmp_path, precision, config=None, steps=3):
    from of_ds.train.loop import train_loop
    from of_ds.train.plan import resolve_plan
    from of_ds.train.trainer import build_trainer

    d = tiny_spec_dict(tiny_tokenizer_dir, str(tmp_path), engine={"kind": "deepspeed", "precision": precision, "zero_stage": 2})
    d["run"]["name"] = precision
    d["checkpoint"]["every_n_steps"] = 100
    if config is not None:
        path = tmp_path / f"{precision}.json"
        path.write_text(json.dumps(config))
        d["engine"]["deepspeed_config"] = str(path)
    spec = RunSpec.from_dict(d)
    plan = resolve_plan(spec, runtime.world_size, data=False).with_steps(steps)
    t = build_trainer(plan, runtime, loader=lambda tok: StandInData(plan.spec, tok))
    engine, spec = t.engine, plan.spec
    state = train_loop(engine, t.data, spec, runtime, t.checkpoints, t.metrics, t.state, steps)
    rows = [json.loads(l) for l in (spec.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return engine, state, rows


def test_fp16_overflow_steps_are_skipped_and_counted(tiny_tokenizer_dir, runtime, tmp_path):
    from deepspeed.accelerator import get_accelerator

    if not torch.cuda.is_available() and not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed's CPU accelerator refuses fp16 on a CPU without oneDNN fp16 (AVX512-FP16/AMX-FP16)")
    cfg = {"fp16": {"enabled": "auto", "initial_scale_power": 40, "loss_scale_window": 1000, "hysteresis": 1, "min_loss_scale": 1}}
    engine, state, rows = run(tiny_tokenizer_dir, runtime, tmp_path, "fp16", cfg)
    assert engine.engine.fp16_enabled() and next(engine.module.parameters()).dtype == torch.float16
    assert state.skipped_steps >= 1 and rows[-1]["skipped_steps"] == state.skipped_steps
    assert engine.engine.optimizer.loss_scale < 2.0**40  # the scaler backed off


def test_bf16_and_autocast_close_to_fp32(tiny_tokenizer_dir, runtime, tmp_path):
    ref = run(tiny_tokenizer_dir, runtime, tmp_path, "fp32")[2]
    for precision in ("bf16", "amp_bf16"):
        engine, _, rows = run(tiny_tokenizer_dir, runtime, tmp_path, precision)
        in_optimizer = sum(p.numel() for g in engine.engine.basic_optimizer.param_groups for p in g["params"])
        assert in_optimizer == sum(p.numel() for p in engine.module.parameters() if p.requires_grad)  # no frozen weights
        if precision == "amp_bf16":
            assert engine.engine.torch_autocast_enabled() and next(engine.module.parameters()).dtype == torch.float32
        for a, b in zip(rows, ref):
            assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), precision
