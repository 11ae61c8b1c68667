"""Engines: DeepSpeed (ZeRO 0-3, offload) and native DDP/FSDP2 behind one small protocol (`base.Engine`)."""

from __future__ import annotations

from .base import Engine, StepStats


def build_engine(model, spec, runtime, total_steps: int, ds_config: dict | None = None) -> Engine:
    """Wrap the plain model for `spec.engine.kind`; `ds_config` is the resolved DeepSpeed config (deepspeed only).
    The model is put in train mode, as the original's loop does: an LM loaded with `from_pretrained` comes in eval
    mode, and its dropout (OPT's 0.1) would otherwise be off for the whole run."""
    model.train()
    if spec.engine.compile:
        # in place, before any wrapper sees the modules
        model.compile_parts(spec.engine.compile_targets, **({} if spec.engine.compile_mode == "default" else {"mode": spec.engine.compile_mode}))
    if spec.engine.kind == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        if ds_config is None:
            from .deepspeed_config import resolve_deepspeed_config

            ds_config, _ = resolve_deepspeed_config(spec, runtime.world_size)
        return DeepSpeedEngine(model, spec, runtime, ds_config, total_steps)
    from .torch_engine import TorchEngine

    return TorchEngine(model, spec, runtime, total_steps)


__all__ = ["Engine", "StepStats", "build_engine"]
