"""Load a `ds_configs/*.json` file and fill its `"auto"` values from the run spec.

The spec is the source of truth for batch sizes, accumulation and clipping. ZeRO stage, offload devices and
precision have one owner each: a value written in the file wins over the spec's default, a value the user set in
the spec (its YAML or `--set`) fills `"auto"` in the file, and two explicit values that disagree are an error naming
both. The shipped recipe specs leave the stage and offload unset, so any `ds_configs/*.json` decides them;
`resolved_engine_line` says what was decided.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..spec import RunSpec, SpecError

AUTO = "auto"
_FORBIDDEN_BLOCKS = ("optimizer", "scheduler")


def load_json_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"engine.deepspeed_config: file not found: {path}"])
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError([f"engine.deepspeed_config: {path} is not valid JSON: {e}"]) from None
    if not isinstance(cfg, dict):
        raise SpecError([f"engine.deepspeed_config: {path} must hold a JSON object"])
    return cfg


def micro_batch_size(spec: RunSpec) -> int:
    """Samples per micro-step on one rank: one micro-batch of every dataset."""
    return sum(d.batch_size for d in spec.data.datasets)


def _explicit(section, field: str) -> bool:
    return field in section.model_fields_set


class _Resolver:
    """Collects conflicts so that one error lists them all."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def fill(self, node: dict, key: str, value: Any, spec_field: str, *, spec_explicit: bool = True) -> None:
        """Set `node[key]` to `value` when it is auto or absent; an explicit different value is a conflict."""
        current = node.get(key, AUTO)
        if current == AUTO:
            node[key] = value
        elif current != value and spec_explicit:
            self.problems.append(
                f"{self.source}: '{key}' is {current!r} but the spec's {spec_field} gives {value!r}; "
                f"set one of them to agree (or write \"auto\" in the config)"
            )


def _precision_blocks(cfg: dict, precision: str, r: _Resolver, explicit: bool) -> None:
    want = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    for block, enabled in want.items():
        node = cfg.setdefault(block, {})
        if not isinstance(node, dict):
            r.problems.append(f"{r.source}: '{block}' must be an object")
            continue
        r.fill(node, "enabled", enabled, f"engine.precision ({precision!r})", spec_explicit=explicit)
    if precision.startswith("amp_"):
        dtype = "bfloat16" if precision == "amp_bf16" else "float16"
        node = cfg.setdefault("torch_autocast", {})
        r.fill(node, "enabled", True, f"engine.precision ({precision!r})")
        r.fill(node, "dtype", dtype, f"engine.precision ({precision!r})")
    elif isinstance(cfg.get("torch_autocast"), dict) and cfg["torch_autocast"].get("enabled") is True:
        r.problems.append(f"{r.source}: 'torch_autocast.enabled' is true but engine.precision is {precision!r} (use amp_bf16/amp_fp16)")


def _precision_from_config(cfg: dict) -> str | None:
    """The precision an explicit config asks for, or None when it leaves it to the spec."""
    ac = cfg.get("torch_autocast") or {}
    if ac.get("enabled") is True:
        return "amp_fp16" if str(ac.get("dtype", "bfloat16")) in ("float16", "fp16", "torch.float16") else "amp_bf16"
    for block in ("bf16", "fp16"):
        if (cfg.get(block) or {}).get("enabled") is True:
            return block
    return None


def resolve_deepspeed_config(spec: RunSpec, world_size: int, config: dict | None = None, source: str = "deepspeed config") -> tuple[dict, RunSpec]:
    """-> (a complete DeepSpeed config, the spec updated with the stage/offload/precision the config fixed)."""
    if config is None and spec.engine.deepspeed_config:
        source = spec.engine.deepspeed_config
        config = load_json_config(source)
    cfg = copy.deepcopy(config) if config is not None else {}
    r = _Resolver(source)
    for block in _FORBIDDEN_BLOCKS:
        if block in cfg:
            r.problems.append(f"{source}: an '{block}' block is not used; the optimizer and schedule come from the spec's optim section")

    eng = spec.engine
    engine_update: dict[str, Any] = {}
    # precision: the config may pin it when the spec left the default
    cfg_precision = _precision_from_config(cfg)
    precision = eng.precision
    if cfg_precision and cfg_precision != precision:
        if _explicit(eng, "precision"):
            r.problems.append(f"{source}: asks for {cfg_precision} but the spec's engine.precision is {precision!r} "
                              f"(set in the spec or by --set); drop one of them")
        else:
            precision = engine_update["precision"] = cfg_precision
    _precision_blocks(cfg, precision, r, explicit=True)

    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", AUTO)
    if stage == AUTO:
        zero["stage"] = eng.zero_stage
    elif stage != eng.zero_stage:
        if _explicit(eng, "zero_stage"):
            r.problems.append(f"{source}: zero_optimization.stage is {stage} but the spec's engine.zero_stage is {eng.zero_stage} "
                              f"(set in the spec or by --set); drop engine.zero_stage for the file's stage to apply")
        else:
            engine_update["zero_stage"] = stage
    for kind in ("optimizer", "param"):
        field = f"offload_{kind}"
        node = zero.get(field)
        spec_dev = getattr(eng, field)
        cfg_dev = (node or {}).get("device", AUTO) if isinstance(node, dict) else AUTO
        if cfg_dev == AUTO:
            if spec_dev != "none":
                zero[field] = {**(node or {}), "device": spec_dev, **({"nvme_path": eng.nvme_path} if spec_dev == "nvme" else {})}
            elif node is not None:
                zero[field] = {**node, "device": "none"}
        elif cfg_dev != spec_dev:
            if _explicit(eng, field):
                r.problems.append(f"{source}: zero_optimization.{field}.device is {cfg_dev!r} but the spec's engine.{field} is "
                                  f"{spec_dev!r} (set in the spec or by --set); drop engine.{field} for the file's to apply")
            else:
                engine_update[field] = cfg_dev
                if cfg_dev == "nvme" and eng.nvme_path is None and node.get("nvme_path"):
                    engine_update["nvme_path"] = node["nvme_path"]

    micro, gas = micro_batch_size(spec), spec.optim.grad_accum_steps
    r.fill(cfg, "train_micro_batch_size_per_gpu", micro, "data.datasets[*].batch_size (summed)")
    r.fill(cfg, "gradient_accumulation_steps", gas, "optim.grad_accum_steps")
    r.fill(cfg, "train_batch_size", micro * gas * world_size, f"batch sizes x optim.grad_accum_steps x world size {world_size}")
    r.fill(cfg, "gradient_clipping", spec.optim.grad_clip, "optim.grad_clip")
    r.fill(cfg, "steps_per_print", spec.logging.every_n_steps, "logging.every_n_steps", spec_explicit=False)
    if r.problems:
        raise SpecError(r.problems)

    resolved = spec
    if engine_update:
        data = spec.to_dict()
        data["engine"].update(engine_update)
        data["engine"]["deepspeed_config"] = spec.engine.deepspeed_config
        resolved = RunSpec.from_dict(data, source=source)
    return cfg, resolved


def resolved_engine_line(spec: RunSpec) -> str:
    """One line: the ZeRO stage, offload and precision the run uses, and where they came from."""
    e = spec.engine
    source = (f"from {e.deepspeed_config} where it writes a value, else from the spec" if e.deepspeed_config
              else "from the spec; no --deepspeed_config")
    return (f"[of_ds] DeepSpeed ZeRO-{e.zero_stage}, offload optimizer: {e.offload_optimizer}, parameters: "
            f"{e.offload_param}, precision {e.precision} ({source})")


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
