"""ds_configs/*.json resolution: `auto` filled from the spec, explicit conflicts named, spec defaults yield."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines_standin import tiny_spec_dict
from of_ds.engines.deepspeed_config import resolve_deepspeed_config
from of_ds.spec import RunSpec, SpecError

REPO = Path(__file__).resolve().parents[2]


def spec(tmp_path, **engine) -> RunSpec:
    d = tiny_spec_dict("tok", str(tmp_path))
    d["engine"] = {"kind": "deepspeed", **engine}
    d["optim"].update(grad_accum_steps=3, grad_clip=0.5)
    return RunSpec.from_dict(d)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_every_shipped_config_resolves(tmp_path, name):
    s = spec(tmp_path, precision="bf16", deepspeed_config=str(REPO / "ds_configs" / name))
    cfg, resolved = resolve_deepspeed_config(s, world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 + 2  # one micro-batch of every dataset
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 5 * 3 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg)
    stage = int(name[4])
    assert cfg["zero_optimization"]["stage"] == stage == resolved.engine.zero_stage  # the file's stage, spec left default
    assert resolved.engine.offload_optimizer == ("cpu" if "offload" in name else "none")
    assert resolved.engine.offload_param == ("cpu" if name == "zero3_offload.json" else "none")


def test_explicit_conflict_names_both(tmp_path):
    s = spec(tmp_path, zero_stage=2)
    with pytest.raises(SpecError) as e:
        resolve_deepspeed_config(s, 2, {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 8}, source="my.json")
    msg = str(e.value)
    assert "my.json: zero_optimization.stage is 3" in msg and "engine.zero_stage is 2" in msg
    assert "'gradient_accumulation_steps' is 8" in msg and "optim.grad_accum_steps gives 3" in msg


def test_precision_blocks_and_autocast(tmp_path):
    cfg, _ = resolve_deepspeed_config(spec(tmp_path, precision="amp_bf16"), 1, {})
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    cfg, _ = resolve_deepspeed_config(spec(tmp_path, precision="fp16"), 1, {"fp16": {"enabled": "auto", "loss_scale": 0}})
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0}
    with pytest.raises(SpecError, match="engine.precision"):
        resolve_deepspeed_config(spec(tmp_path, precision="fp32"), 1, {"bf16": {"enabled": True}})
    # the spec left precision at its default: the config decides
    d = tiny_spec_dict("tok", str(tmp_path))
    d["engine"] = {"kind": "deepspeed"}
    _, resolved = resolve_deepspeed_config(RunSpec.from_dict(d), 1, {"bf16": {"enabled": True}})
    assert resolved.engine.precision == "bf16"


def test_optimizer_block_rejected_and_monitors_pass_through(tmp_path):
    with pytest.raises(SpecError, match="optimizer"):
        resolve_deepspeed_config(spec(tmp_path), 1, {"optimizer": {"type": "Adam"}})
    cfg, _ = resolve_deepspeed_config(spec(tmp_path), 1, {"tensorboard": {"enabled": True, "output_path": "tb"}})
    assert cfg["tensorboard"] == {"enabled": True, "output_path": "tb"}


def test_offload_from_spec_when_config_says_auto(tmp_path):
    s = spec(tmp_path, zero_stage=3, offload_optimizer="nvme", offload_param="cpu", nvme_path="/nvme")
    cfg, _ = resolve_deepspeed_config(s, 1, {"zero_optimization": {"stage": "auto"}})
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme"} and z["offload_param"]["device"] == "cpu"


def test_one_rank_turns_reduce_scatter_off_only_where_it_is_the_default():
    """`sync_free_ds_config` on one rank: overlap_comm off; reduce_scatter off unless the config sets it or scales
    the gradients around the averaging (then DeepSpeed's own choice stands); nothing on more ranks or ZeRO-3."""
    from of_ds.engines.deepspeed_patches import sync_free_ds_config

    base = {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    assert sync_free_ds_config(base, 1, False)["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_scatter": False}
    assert sync_free_ds_config(base, 2, False)["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert sync_free_ds_config({"zero_optimization": {"stage": 1, "reduce_scatter": True}}, 1, False)["zero_optimization"]["reduce_scatter"] is True
    for scaled in ({"gradient_predivide_factor": 2.0}, {"prescale_gradients": True}):
        assert "reduce_scatter" not in sync_free_ds_config({**base, **scaled}, 1, False)["zero_optimization"]
    assert sync_free_ds_config({"zero_optimization": {"stage": 3}}, 1, False)["zero_optimization"] == {"stage": 3}
    assert base == {"zero_optimization": {"stage": 2, "overlap_comm": True}}  # the caller's dict is left alone
