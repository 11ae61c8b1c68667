"""The gate of of_ds's DeepSpeed patches, in process, on stand-in optimizers: the versions they were written for,
the off switch, the up-front check of every DeepSpeed attribute they touch, and their record in `meta.json`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from of_ds.engines import deepspeed_patches as dp
from of_ds.engines.deepspeed_patches import DeepSpeedPatchError


class DeepSpeedZeroOptimizer:  # the name the ZeRO-1/2 patches look for
    def __init__(self, **attrs):
        self.check_overflow = self.unscale_and_clip_grads = self.get_grad_norm_direct = lambda *a, **k: "deepspeed"
        self.check_grad_overflow, self.compute_grad_norm, self.cpu_offload, self.dtype = True, True, False, torch.bfloat16
        self.clip_grad, self.loss_scale = 1.0, 1.0
        self.dp_process_group = self.model_parallel_group = None
        self.model_parallel_rank, self.device = 0, "cpu"
        self.__dict__.update(attrs)


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(dp, "deepspeed_version", lambda: "0.19.3")
    monkeypatch.delenv(dp.OFF_SWITCH, raising=False)


@pytest.mark.parametrize("version, ok", [("0.19.0", True), ("0.19.3", True), ("0.19.3+cpu.abc", True), ("0.19", True),
                                         ("0.18.9", False), ("0.20.0", False), ("1.19.0", False), ("0.190.1", False)])
def test_version_gate(version, ok):
    assert dp.version_supported(version) is ok


def test_the_installed_deepspeed_is_one_the_patches_were_written_for():
    assert dp.version_supported(dp.deepspeed_version())  # setup.cfg pins what SUPPORTED names


def test_patches_apply_on_a_supported_deepspeed(supported):
    opt = DeepSpeedZeroOptimizer(check_grad_overflow=True)
    assert dp.why_not_patched() is None
    assert dp.drop_redundant_overflow_scan(opt) and opt.check_overflow() is None  # DeepSpeed's scan replaced
    opt = DeepSpeedZeroOptimizer(check_grad_overflow=False)
    assert dp.install_sync_free_clip(opt) and opt.unscale_and_clip_grads([], 1.0) == "deepspeed"  # a host norm: DeepSpeed's clip


@pytest.mark.parametrize("setting", ["0", "false", "off"])
def test_the_off_switch_leaves_deepspeed_alone(supported, monkeypatch, setting):
    monkeypatch.setenv(dp.OFF_SWITCH, setting)
    assert dp.why_not_patched() == f"{dp.OFF_SWITCH}={setting}"
    opt = DeepSpeedZeroOptimizer(check_grad_overflow=False)
    assert not dp.drop_redundant_overflow_scan(opt) and not dp.install_sync_free_clip(opt)
    assert not dp.install_foreach_grad_norm(opt)
    assert opt.check_overflow() == opt.unscale_and_clip_grads() == opt.get_grad_norm_direct() == "deepspeed"


def test_another_deepspeed_is_left_alone(monkeypatch):
    monkeypatch.setattr(dp, "deepspeed_version", lambda: "0.20.1")
    monkeypatch.delenv(dp.OFF_SWITCH, raising=False)
    assert "DeepSpeed 0.20.1" in dp.why_not_patched() and "0.19.x" in dp.why_not_patched()
    opt = DeepSpeedZeroOptimizer()
    assert not dp.drop_redundant_overflow_scan(opt) and opt.check_overflow() == "deepspeed"


def test_another_optimizer_class_is_not_patched(supported):
    class DeepSpeedZeroOptimizer_Stage3(DeepSpeedZeroOptimizer):  # noqa: N801 - DeepSpeed's name
        pass

    opt = DeepSpeedZeroOptimizer_Stage3(check_grad_overflow=False)
    assert not dp.drop_redundant_overflow_scan(opt) and not dp.install_sync_free_clip(opt)


@pytest.mark.parametrize("patch, install, attribute", [
    ("overflow_scan", dp.drop_redundant_overflow_scan, "compute_grad_norm"),
    ("sync_free_clip", dp.install_sync_free_clip, "loss_scale"),
    ("foreach_grad_norm", dp.install_foreach_grad_norm, "model_parallel_rank"),
])
def test_a_missing_attribute_is_an_error_naming_it(supported, patch, install, attribute):
    opt = DeepSpeedZeroOptimizer(check_grad_overflow=False)
    delattr(opt, attribute) if attribute in opt.__dict__ else None
    assert attribute in dp.NEEDS[patch]
    with pytest.raises(DeepSpeedPatchError, match=rf"'{patch}' relies on {attribute} \(DeepSpeedZeroOptimizer\).*"
                                                  rf"{dp.OFF_SWITCH}=0"):
        install(opt)
    assert opt.check_overflow() == opt.unscale_and_clip_grads() == "deepspeed"  # nothing half-patched


def _nvme_optimizer(**leave_out):
    names = [n for n in dp.NEEDS["nvme_optimizer_state"] if not n.startswith("engine.") and n not in leave_out]
    opt = SimpleNamespace(swap_optimizer=True, **{n: None for n in names})
    engine = SimpleNamespace(optimizer=opt, _get_zero_ckpt_name=lambda d, t: f"{d}/{t}/optim.pt")
    return opt, engine


def test_nvme_patch_checks_every_attribute_before_touching_anything(supported):
    opt, engine = _nvme_optimizer(_release_swap_buffers=True)
    with pytest.raises(DeepSpeedPatchError, match="_release_swap_buffers"):
        dp.save_swapped_fp32_weights(engine, "dir", "tag")
    with pytest.raises(DeepSpeedPatchError, match="_release_swap_buffers"):
        dp.load_with_nvme_optimizer_state(engine, "dir", "tag", lambda: pytest.fail("loaded"))
    opt, engine = _nvme_optimizer()
    del engine._get_zero_ckpt_name
    with pytest.raises(DeepSpeedPatchError, match="engine._get_zero_ckpt_name"):
        dp.load_with_nvme_optimizer_state(engine, "dir", "tag", lambda: pytest.fail("loaded"))


def test_nvme_resume_is_refused_with_the_patches_off(supported, monkeypatch):
    monkeypatch.setenv(dp.OFF_SWITCH, "0")
    opt, engine = _nvme_optimizer()
    with pytest.raises(DeepSpeedPatchError, match=rf"off here \({dp.OFF_SWITCH}=0\).*load_weights_only"):
        dp.load_with_nvme_optimizer_state(engine, "dir", "tag", lambda: pytest.fail("loaded"))
    assert dp.save_swapped_fp32_weights(engine, "dir", "tag") == 0  # DeepSpeed's own checkpoint


def test_without_nvme_offload_nothing_is_checked(supported):
    engine = SimpleNamespace(optimizer=SimpleNamespace(swap_optimizer=False))
    assert dp.load_with_nvme_optimizer_state(engine, "dir", "tag", lambda: "loaded") == "loaded"
    assert dp.save_swapped_fp32_weights(engine, "dir", "tag") == 0


def test_applied_patches_are_recorded_in_meta_json(tmp_path):
    from of_ds.spec import RunSpec
    from of_ds.train.checkpoint import CheckpointManager, TrainState

    runtime = SimpleNamespace(is_main=True, rank=0, world_size=1, barrier=lambda: None)
    spec = RunSpec.from_dict({"model": {"lm": {"name_or_path": "lm"}}, "engine": {"kind": "deepspeed"},
                              "data": {"datasets": [{"name": "d", "kind": "laion", "shards": "x.tar", "batch_size": 1}]}})
    engine = SimpleNamespace(applied_patches=dp.applied([("overflow_scan", False), ("foreach_grad_norm", True)]),
                             save=lambda path, client_state: None)
    path = CheckpointManager(tmp_path, 2, 1, runtime).save(engine, TrainState(step=1), spec, {"data": {}})
    assert json.loads((path / "meta.json").read_text())["deepspeed_patches"] == ["foreach_grad_norm"]
    ddp = spec.updated({"engine.kind": "ddp"})
    path = CheckpointManager(tmp_path, 2, 1, runtime).save(engine, TrainState(step=2), ddp, {"data": {}})
    assert "deepspeed_patches" not in json.loads((path / "meta.json").read_text())
