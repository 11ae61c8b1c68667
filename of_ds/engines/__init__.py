"""Engines: DeepSpeed (ZeRO 0-3, offload) and native DDP/FSDP2 behind one small protocol (`base.Engine`)."""

from __future__ import annotations

from .base import Engine, StepStats


def build_engine(model, spec, runtime, total_steps: int, ds_config: dict | None = None) -> Engine:
    """Apply the training features (`prepare.prepare_model`), then wrap the model for `spec.engine.kind`.
    `ds_config`: the final DeepSpeed config of the run's plan (`of_ds.train.plan`; required for deepspeed)."""
    from .prepare import prepare_model

    if spec.engine.kind == "deepspeed" and ds_config is None:
        raise ValueError("build_engine: engine.kind=deepspeed needs the resolved DeepSpeed config (the plan's ds_config)")
    fuse = prepare_model(model, spec)
    if spec.engine.kind == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, spec, runtime, ds_config, total_steps, fuse)
    from .torch_engine import TorchEngine

    return TorchEngine(model, spec, runtime, total_steps, fuse)


__all__ = ["Engine", "StepStats", "build_engine"]
