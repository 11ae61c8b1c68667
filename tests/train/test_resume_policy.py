"""The resume policy without a process group: the spec diff and its verdicts, the run-dir refusals, the schedule."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from engines_standin import checkpoint_of
from of_ds.engines.optim import LrSchedule, build_scheduler
from of_ds.runtime import Runtime
from of_ds.spec import OptimSpec, RunSpec, SpecError
from of_ds.train import resume_policy as rp
from of_ds.train.checkpoint import TrainState
from of_ds.train.plan import ResumePoint, resolve_plan

DEMO = Path(__file__).resolve().parents[2] / "launch" / "specs" / "demo.yaml"
RUNTIME = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")  # no process group


def demo(*sets: str, tmp: Path | None = None) -> RunSpec:
    out = [f"run.output_dir={tmp}"] if tmp else []
    return RunSpec.from_yaml(DEMO, [*out, *sets])


def leaves(d: dict, prefix: str = "") -> dict:
    """Dotted field -> value, datasets by name, as the policy names them."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(leaves(v, key + "."))
        elif key == "data.datasets":
            for entry in v:
                out.update(leaves(entry, f"{key}.{entry['name']}."))
        else:
            out[key] = v
    return out


def test_every_spec_field_has_a_resume_policy():
    """A new spec field must be placed in POLICY (and so in the README's table), never fall through to UNKNOWN."""
    spec = demo().to_dict()
    fields = leaves(spec)
    assert "data.datasets.mmc4.max_images" in fields and "optim.schedule_on_resume" in fields
    for field, value in fields.items():
        assert rp.classify(field, value, value, spec) != rp.UNKNOWN, field


def test_the_readme_table_is_the_policy():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| `([^`]+)`", readme, re.M)}
    for pattern, _ in rp.POLICY:
        assert pattern in rows, f"README's resume table lacks {pattern}"


def test_changes_are_classified_by_field():
    old = demo()
    new = demo("optim.lr=1e-4", "run.max_steps=800", "logging.every_n_steps=5", "model.perceiver.depth=1",
               "data.datasets.mmc4.kind=chatgpt", "data.datasets.laion.loss_weight=0.5", "run.seed=1",
               "data.datasets.laion.shards=/elsewhere/laion/{000000..000003}.tar", "data.datasets.mmc4.shards=other/{0..3}.tar")
    changes, unmatched = rp.spec_changes(old.to_dict(), new.to_dict())
    verdicts = {c.field: c.verdict for c in changes}
    assert verdicts == {
        "optim.lr": rp.EFFECT, "run.max_steps": rp.EFFECT, "logging.every_n_steps": rp.EFFECT,
        "model.perceiver.depth": rp.REFUSED, "data.datasets.mmc4.kind": rp.REFUSED,
        "data.datasets.laion.loss_weight": rp.EFFECT, "run.seed": rp.REFUSED,
        "data.datasets.laion.shards": rp.EFFECT, "data.datasets.mmc4.shards": rp.REFUSED,
    }
    assert unmatched == []


def test_engine_verdicts_depend_on_both_sides():
    spec = demo().to_dict()
    assert rp.classify("engine.zero_stage", 1, 2, spec)[0] == rp.EFFECT
    assert rp.classify("engine.zero_stage", 2, 3, spec)[0] == rp.REFUSED
    assert rp.classify("engine.kind", "ddp", "fsdp", spec)[0] == rp.EFFECT
    assert rp.classify("engine.kind", "deepspeed", "ddp", spec)[0] == rp.REFUSED
    assert rp.classify("engine.offload_optimizer", "none", "cpu", spec)[0] == rp.EFFECT
    assert rp.classify("engine.offload_optimizer", "cpu", "nvme", spec)[0] == rp.REFUSED


def test_moved_frozen_weights_take_effect_other_ones_are_refused():
    spec = demo().to_dict()
    assert rp.classify("model.lm.name_or_path", "demo_data/lm", "/data/copies/lm/", spec)[0] == rp.EFFECT
    assert rp.classify("model.lm.name_or_path", "anas-awadalla/mpt-1b-redpajama-200b", "/m/mpt-1b-redpajama-200b", spec)[0] == rp.EFFECT
    assert rp.classify("model.vision.pretrained", "openai", "laion2b_s32b_b82k", spec)[0] == rp.REFUSED
    assert rp.classify("model.tokenizer", None, "demo_data/tokenizer", spec)[0] == rp.REFUSED


def test_a_section_set_on_one_side_only_is_one_change():
    old = demo().to_dict()
    new = demo().to_dict()
    old["model"]["lm"]["config"] = None
    new["model"]["lm"]["config"] = {"model_type": "llama", "num_hidden_layers": 4}
    (change,), unmatched = rp.spec_changes(old, new)
    assert (change.field, change.verdict, unmatched) == ("model.lm.config", rp.REFUSED, [])


def test_datasets_added_or_removed_are_refused():
    old = demo().to_dict()
    new = demo().to_dict()
    new["data"]["datasets"] = new["data"]["datasets"][:1]
    changes, unmatched = rp.spec_changes(old, new)
    assert [(c.field, c.old, c.new, c.verdict) for c in changes] == [("data.datasets", ["laion", "mmc4"], ["laion"], rp.REFUSED)]
    assert unmatched == []  # the removed dataset's fields are the one change above


def test_fields_of_another_version_are_listed_not_compared():
    old = demo().to_dict()
    del old["optim"]["schedule_on_resume"]
    assert rp.spec_changes(old, demo().to_dict()) == ([], ["optim.schedule_on_resume"])


def test_refused_changes_are_one_error_naming_every_field(tmp_path, capsys):
    path = checkpoint_of(demo(tmp=tmp_path))
    new = demo("model.perceiver.depth=1", "optim.grad_accum_steps=2", "optim.lr=1e-4", tmp=tmp_path)
    with pytest.raises(SpecError) as e:
        resolve_plan(new, 1, data=False)  # resumes its run's newest checkpoint, `path`
    msg = str(e.value)
    assert "model.perceiver.depth: 2 -> 1 (refused" in msg and "optim.grad_accum_steps: 1 -> 2 (refused" in msg
    assert "optim.lr" not in msg  # a change that takes effect is no problem
    assert f"checkpoint.resume_from={path} checkpoint.load_weights_only=true" in msg
    assert e.value.problems[-1].startswith("resume with the checkpoint's values")


def test_accepted_changes_are_printed(tmp_path, capsys):
    path = checkpoint_of(demo(tmp=tmp_path))
    plan = resolve_plan(demo("optim.lr=1e-4", "run.max_steps=800", tmp=tmp_path), 1, data=False)
    assert (plan.resume.kind, plan.resume.path) == ("full", path)
    assert plan.resume.saved_spec == yaml.safe_load((path / "spec.yaml").read_text())
    out = "\n".join(plan.notes)  # build_trainer prints them on rank 0
    assert f"resuming {path} with 2 spec change(s)" in out
    assert "optim.lr: 0.003 -> 0.0001 (takes effect: the schedule's new peak" in out
    assert "run.max_steps: 400 -> 800 (takes effect" in out


def _write_run(spec: RunSpec, steps: int = 4) -> None:
    checkpoint_of(spec, steps)
    (spec.run.run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps + 1)))


def test_a_fresh_start_on_a_run_refuses_naming_the_dir_and_the_flag(tmp_path):
    spec = demo("checkpoint.resume=never", tmp=tmp_path)
    _write_run(spec)
    with pytest.raises(SpecError) as e:
        rp.prepare_run_dir(spec, None, RUNTIME)
    msg = str(e.value)
    assert str(spec.run.run_dir) in msg and "checkpoint.on_existing" in msg and "metrics.jsonl (4 rows)" in msg
    assert (spec.run.run_dir / "metrics.jsonl").is_file()  # nothing touched


@pytest.mark.parametrize("action", ["move_aside", "delete"])
def test_a_fresh_start_moves_or_deletes_the_old_run(tmp_path, action, capsys):
    spec = demo("checkpoint.resume=never", f"checkpoint.on_existing={action}", tmp=tmp_path)
    _write_run(spec)
    rp.prepare_run_dir(spec, None, RUNTIME)
    assert not spec.run.run_dir.exists()
    aside = list(tmp_path.glob(f"{spec.run.name}.old-*"))
    if action == "delete":
        assert aside == []
    else:
        (moved,) = aside
        assert (moved / "metrics.jsonl").read_text().count("\n") == 4 and (moved / "checkpoints" / "step-00000004").is_dir()
        assert f"aside to {moved}" in capsys.readouterr().out


def test_a_weights_only_start_into_a_run_dir_is_a_fresh_start(tmp_path):
    other = demo("run.name=other", tmp=tmp_path)
    src = checkpoint_of(other)
    spec = demo(f"checkpoint.resume_from={src}", "checkpoint.load_weights_only=true", tmp=tmp_path)
    _write_run(spec)
    with pytest.raises(SpecError, match="checkpoint.on_existing"):
        rp.prepare_run_dir(spec, src, RUNTIME)


def test_a_weights_only_start_from_inside_the_run_dir_it_would_move_is_refused(tmp_path):
    spec = demo("checkpoint.resume=never", "checkpoint.on_existing=move_aside", tmp=tmp_path)
    _write_run(spec)
    inside = spec.run.run_dir / "checkpoints" / "step-00000004"
    spec = demo("checkpoint.resume=never", "checkpoint.on_existing=move_aside", f"checkpoint.resume_from={inside}",
                "checkpoint.load_weights_only=true", tmp=tmp_path)
    with pytest.raises(SpecError, match="copy it elsewhere first"):
        rp.prepare_run_dir(spec, inside, RUNTIME)
    assert inside.is_dir()


def test_a_plain_start_moves_an_attempt_without_checkpoints_aside(tmp_path, capsys):
    spec = demo(tmp=tmp_path)
    spec.run.run_dir.mkdir(parents=True)
    (spec.run.run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    rp.prepare_run_dir(spec, None, RUNTIME)
    assert not spec.run.run_dir.exists() and "no checkpoint to resume" in capsys.readouterr().out


def test_a_requeued_command_continues_its_own_run_not_resume_from(tmp_path, capsys):
    """The same command started again after a preemption: the run's own checkpoint wins over a resume_from outside the
    run dir (weights only or not), so the run continues; one inside the run dir (going back) is read as given."""
    from of_ds.train.plan import find_resume_point, prefer_own_checkpoint

    src = checkpoint_of(demo("run.name=other", tmp=tmp_path))
    spec = demo(f"checkpoint.resume_from={src}", "checkpoint.load_weights_only=true", tmp=tmp_path)
    assert prefer_own_checkpoint(spec) == (spec, None)  # the first start: nothing of its own yet
    assert resolve_plan(spec, 1, data=False).resume == ResumePoint("weights_only", src)
    _write_run(spec)
    again, note = prefer_own_checkpoint(spec)
    own = spec.run.run_dir / "checkpoints" / "step-00000004"
    assert (again.checkpoint.resume_from, again.checkpoint.load_weights_only) == (None, False)
    plan = resolve_plan(spec, 1, data=False)
    assert (plan.resume.kind, plan.resume.path) == ("full", own) and plan.resume.saved_spec is not None
    assert f"checkpoint.resume_from={src} is not read" in note and note in plan.notes
    earlier = checkpoint_of(spec, 2)
    back = demo(f"checkpoint.resume_from={earlier}", tmp=tmp_path)
    assert prefer_own_checkpoint(back) == (back, None) and find_resume_point(back) == earlier
    assert prefer_own_checkpoint(demo(f"checkpoint.resume_from={src}", "checkpoint.resume=never", tmp=tmp_path))[0].checkpoint.resume_from == str(src)


def test_a_resume_of_its_own_checkpoint_keeps_the_run_dir(tmp_path):
    spec = demo(tmp=tmp_path)
    _write_run(spec)
    path = spec.run.run_dir / "checkpoints" / "step-00000004"
    rp.prepare_run_dir(spec, path, RUNTIME)
    assert resolve_plan(spec, 1, data=False).resume.path == path
    assert (spec.run.run_dir / "metrics.jsonl").is_file()


# ------------------------------------------------------------------------------------------------- schedule
def test_continue_has_no_jump_and_recompute_restretches():
    old = LrSchedule("cosine", 2, 4)
    new = LrSchedule("cosine", 2, 8)
    cont, said = rp.resumed_schedule(old, new, 4, "continue")
    assert "continues from the last step's multiplier 0.5" in said
    seq = [cont(s) for s in range(3, 9)]
    assert seq[0] == pytest.approx(old(3)) and all(a > b for a, b in zip(seq, seq[1:-1])) and seq[-1] == 0.0
    again, _ = rp.resumed_schedule(old, new, 4, "recompute")
    assert again(4) == pytest.approx(new(4)) and again(4) > old(3)  # the jump the user asked for


def test_unchanged_shape_keeps_the_checkpoints_schedule():
    anchored = LrSchedule("cosine", 2, 8, anchor=[3, 0.5])
    kept, said = rp.resumed_schedule(anchored, LrSchedule("cosine", 2, 8), 6, "continue")
    assert kept is anchored and said.startswith("unchanged")
    anew, said = rp.resumed_schedule(anchored, LrSchedule("cosine", 2, 8), 6, "recompute")
    assert anew.anchor is None and anew(6) == pytest.approx(LrSchedule("cosine", 2, 8)(6)) and "anew" in said


def test_a_continued_schedule_is_checkpointed_by_the_scheduler():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "name": "no_decay"}], lr=1.0)
    sched = build_scheduler(opt, OptimSpec(lr=1.0, schedule="cosine", warmup_steps=2), total_steps=8)
    sched.lr_lambdas[0].__dict__.update(anchor=[3, 0.5], checkpointed=True)
    state = sched.state_dict()
    fresh = build_scheduler(torch.optim.SGD([p], lr=1.0), OptimSpec(lr=1.0, schedule="cosine", warmup_steps=2), total_steps=8)
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].anchor == [3, 0.5] and fresh.lr_lambdas[0].checkpointed


class _Engine:
    def __init__(self, optim: OptimSpec, total: int):
        p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        self.optimizer = torch.optim.AdamW([{"params": [p], "weight_decay": 0.1, "name": "decay"},
                                            {"params": [q], "weight_decay": 0.0, "name": "no_decay"}], lr=optim.lr)
        self.scheduler = build_scheduler(self.optimizer, optim, total)


def test_apply_schedule_sets_this_specs_lr_and_hyperparameters(tmp_path, capsys):
    """A loaded optimizer and scheduler carry the checkpoint's peak lr, weight decay and betas: this spec's replace them."""
    old = demo("optim.warmup_steps=2", "run.max_steps=4", tmp=tmp_path)
    ckpt = _Engine(old.optim, 4)
    for _ in range(2):  # the checkpoint at step 2
        ckpt.optimizer.step()
        ckpt.scheduler.step()
    ckpt.scheduler.lr_lambdas[0].checkpointed = ckpt.scheduler.lr_lambdas[1].checkpointed = True
    new = demo("optim.warmup_steps=2", "run.max_steps=4", "optim.lr=1e-3", "optim.weight_decay=0.05", "optim.betas=[0.8,0.9]", tmp=tmp_path)
    engine = _Engine(new.optim, 4)
    engine.optimizer.load_state_dict(ckpt.optimizer.state_dict())
    engine.scheduler.load_state_dict(ckpt.scheduler.state_dict())
    assert engine.scheduler.base_lrs == [3e-3, 3e-3]  # what a plain load keeps
    rp.apply_schedule(engine, new, old.to_dict(), TrainState(step=2), 4, 80, RUNTIME)
    decay, no_decay = engine.optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1e-3)  # multiplier 1 at the end of warmup
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0) and decay["betas"] == (0.8, 0.9)
    engine.optimizer.step()
    engine.scheduler.step()
    assert decay["lr"] == pytest.approx(1e-3 * 0.5)
    assert "peak 0.003 -> 0.001" in capsys.readouterr().out


def test_a_checkpoint_without_schedule_state_is_rebuilt_from_its_spec(tmp_path):
    old = demo("optim.warmup_steps=2", "run.max_steps=4", tmp=tmp_path)
    engine = _Engine(old.optim, 8)  # built for the new horizon; nothing loaded over its schedule
    new = demo("optim.warmup_steps=2", "run.max_steps=8", tmp=tmp_path)
    rp.apply_schedule(engine, new, old.to_dict(), TrainState(step=4), 8, 80, RUNTIME)
    assert engine.scheduler.lr_lambdas[0].anchor == [3, pytest.approx(0.5)]


@pytest.mark.slow
def test_a_refused_resume_exits_2_before_the_model_is_built(tmp_path, link_demo_data):
    """launch/train.py, one process: a resume with another perceiver depth stops with the spec errors' exit code."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
    from engines_launch import FAST, launch

    from of_ds.engines.deepspeed_config import resolve_deepspeed_config

    link_demo_data(tmp_path / "demo_data")
    saved = resolve_deepspeed_config(RunSpec.from_yaml(DEMO, [*FAST, "run.name=arch", "engine.heartbeat_timeout_s=0"]), 1)[1]
    path = tmp_path / "runs" / "arch" / "checkpoints" / "step-00000004"
    path.mkdir(parents=True)
    (path / "spec.yaml").write_text(saved.to_yaml())
    (path / "COMPLETE").write_text("4\n")
    proc = launch(tmp_path, "python", "arch", ["model.perceiver.depth=1", "engine.heartbeat_timeout_s=0"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "- model.perceiver.depth: 2 -> 1 (refused: the architecture" in proc.stderr
    assert "resumed from" not in proc.stdout
