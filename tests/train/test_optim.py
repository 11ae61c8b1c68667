"""AdamW groups (decay on cross-attention only, frozen excluded) and warmup schedules in optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from of_ds.spec import OptimSpec
from of_ds.engines.optim import build_optimizer, build_param_groups, build_scheduler, lr_lambda


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.perceiver = nn.Linear(2, 2)
        self.layer = nn.Module()
        self.layer.gated_cross_attn_layer = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_groups():
    m = Toy()
    groups = build_param_groups(m, 0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["decay"]["params"]} == {id(p) for p in m.layer.gated_cross_attn_layer.parameters()}
    assert {id(p) for p in by_name["no_decay"]["params"]} == {id(p) for p in m.perceiver.parameters()}
    opt = build_optimizer(m, OptimSpec(lr=1e-3))
    assert sum(len(g["params"]) for g in opt.param_groups) == 4  # frozen weights not in the optimizer


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules(schedule):
    f = lr_lambda(schedule, warmup_steps=4, total_steps=14)
    assert [f(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    end = {"constant": 1.0, "linear": 0.0, "cosine": 0.0}[schedule]
    assert f(14) == pytest.approx(end, abs=1e-12)
    mid = {"constant": 1.0, "linear": 0.5, "cosine": 0.5}[schedule]
    assert f(9) == pytest.approx(mid)
    if schedule == "cosine":
        assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_scheduler_counts_optimizer_steps():
    m = Toy()
    opt = build_optimizer(m, OptimSpec(lr=1.0, schedule="linear", warmup_steps=0))
    sched = build_scheduler(opt, OptimSpec(lr=1.0, schedule="linear", warmup_steps=0), total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 0.75, 0.5, 0.25]
