"""The frozen plan (`of_ds.train.plan.resolve_plan`): one resolution of the engine settings, the DeepSpeed JSON, the
step budget and where a run starts, and the Python API that trains through it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pydantic
import pytest

from engines_standin import checkpoint_of
from of_ds.spec import RunSpec, SpecError
from of_ds.train.plan import ResumePoint, resolve_plan

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "launch" / "specs" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, link_demo_data):
    """A launch dir holding the session's demo dataset (the demo spec's paths are relative to it)."""
    root = tmp_path_factory.mktemp("plan")
    link_demo_data(root / "demo_data")
    return root


@pytest.fixture(autouse=True)
def _in_demo_dir(demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)  # the demo spec names its shards relative to the launch dir


def demo(root: Path, *sets: str) -> RunSpec:
    return RunSpec.from_yaml(DEMO, [f"run.output_dir={root / 'runs'}", f"run.demo_data={root / 'demo_data'}",
                                    *[s.replace("ROOT", str(root)) for s in sets]])


def sizes(root: Path, name: str) -> int:
    return sum(json.loads((root / "demo_data" / name / "sizes.json").read_text()).values())


def test_the_plan_resolves_the_config_and_the_step_budget_once(demo_dir):
    spec = demo(demo_dir, "run.name=budget", "run.max_steps=null", "run.epochs=2", "optim.grad_accum_steps=2",
                "data.datasets.laion.samples_per_epoch=null")  # laion: a pass over sizes.json
    plan = resolve_plan(spec, 2)
    laion, mmc4 = spec.data.datasets
    samples = {d.name: d.samples_per_epoch or sizes(demo_dir, d.name) for d in (laion, mmc4)}  # the spec's, else sizes.json
    per_rank = {d.name: math.ceil(math.ceil(samples[d.name] / (d.batch_size * 2)) / max(1, d.workers)) * max(1, d.workers)
                for d in (laion, mmc4)}
    assert plan.micro_steps_per_epoch == min(per_rank.values())
    assert plan.total_steps == plan.micro_steps_per_epoch // 2 * 2  # epochs x optimizer steps per epoch
    assert plan.micro_batch == laion.batch_size + mmc4.batch_size
    cfg = plan.ds_config
    assert cfg["zero_optimization"]["stage"] == plan.spec.engine.zero_stage == plan.zero_stage
    assert cfg["train_batch_size"] == plan.micro_batch * 2 * 2 and cfg["gradient_accumulation_steps"] == 2
    cfg["zero_optimization"]["stage"] = 99  # a copy: the plan keeps its own
    assert plan.ds_config["zero_optimization"]["stage"] == plan.zero_stage
    assert plan.resume == ResumePoint() and plan.resume.kind == "fresh"
    assert resolve_plan(demo(demo_dir, "run.name=budget", "run.max_steps=3"), 2).total_steps == 3


def test_the_plan_and_the_spec_are_read_only(demo_dir):
    plan = resolve_plan(demo(demo_dir, "run.name=frozen"), 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 1
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        plan.spec.engine.zero_stage = 3
    assert plan.with_steps(7).total_steps == 7 and plan.total_steps != 7


def test_the_deepspeed_file_owns_the_stage_the_plan_reports(demo_dir):
    spec = demo(demo_dir, "run.name=file", "engine.kind=deepspeed", f"engine.deepspeed_config={REPO / 'ds_configs' / 'zero3.json'}")
    plan = resolve_plan(spec, 1, data=False)
    assert plan.spec.engine.zero_stage == plan.ds_config["zero_optimization"]["stage"] == 3 and plan.total_steps is None


def test_where_a_run_starts(demo_dir, tmp_path):
    root = tmp_path
    (root / "demo_data").symlink_to(demo_dir / "demo_data")
    spec = demo(root, "run.name=kinds")
    assert resolve_plan(spec, 2, data=False).resume.kind == "fresh"
    same = checkpoint_of(spec, 2, world_size=2)
    full = resolve_plan(spec, 2, data=False)
    assert (full.resume.kind, full.resume.path, full.resume.universal_dir) == ("full", same, None)
    assert full.resume.saved_spec["run"]["name"] == "kinds" and "load_universal" not in json.dumps(full.ds_config)
    other = resolve_plan(spec, 1, data=False)  # ZeRO partitions saved by 2 ranks, resumed by 1
    assert (other.resume.kind, other.resume.universal_dir) == ("universal", spec.run.run_dir / "universal" / same.name)
    assert other.ds_config["checkpoint"]["load_universal"] is True
    weights = demo(root, "run.name=weights", f"checkpoint.resume_from={same}", "checkpoint.load_weights_only=true")
    assert resolve_plan(weights, 1, data=False).resume == ResumePoint("weights_only", same)
    original = root / "checkpoint.pt"
    original.write_bytes(b"")
    start = resolve_plan(demo(root, "run.name=original", f"checkpoint.resume_from={original}"), 1, data=False).resume
    assert start.kind == "weights_only" and start.original
    assert resolve_plan(demo(root, "run.name=kinds", "checkpoint.resume=never"), 2, data=False).resume.kind == "fresh"


def test_a_resume_under_another_zero_family_is_refused_by_the_plan(demo_dir, tmp_path):
    (tmp_path / "demo_data").symlink_to(demo_dir / "demo_data")
    spec = demo(tmp_path, "run.name=family")
    checkpoint_of(demo(tmp_path, "run.name=family", "engine.zero_stage=3"), 2)
    with pytest.raises(SpecError, match=r"engine.zero_stage: 3 -> 2 \(refused"):
        resolve_plan(spec, 1, data=False)


def test_an_epoch_shorter_than_the_accumulation_is_a_spec_error(demo_dir):
    with pytest.raises(SpecError, match="optim.grad_accum_steps=100000"):
        resolve_plan(demo(demo_dir, "run.name=short", "optim.grad_accum_steps=100000"), 1)


@pytest.mark.slow
def test_the_python_api_trains_through_the_same_path(demo_dir, capsys):
    """`of_ds.api.train(spec path, overrides)`: preflight, plan, build_trainer and the loop, in this process; the
    run's files are launch/train.py's."""
    from engines_launch import FAST

    from of_ds.api import train

    state = train(DEMO, [*FAST, f"run.output_dir={demo_dir / 'runs'}", f"run.demo_data={demo_dir / 'demo_data'}",
                         "run.name=api", "run.max_steps=2", "engine.kind=ddp", "engine.heartbeat_timeout_s=0"])
    run_dir = demo_dir / "runs" / "api"
    assert state.step == 2 and (run_dir / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert [json.loads(r)["step"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    out = capsys.readouterr().out
    assert "[of_ds] plan: DDP, 1 rank(s)" in out and "start: fresh (step 0)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["step"], summary["total_steps"], summary["this_start"]["steps"]) == (2, 2, 2)


def test_the_dry_run_prints_the_plan_and_where_the_run_would_start(demo_dir, tmp_path, capsys):
    """launch/train.py --dry-run, in process: the plan line names the start; a resume at another world size goes
    through the universal format, which the printed DeepSpeed config then loads."""
    from engines_launch import train_main

    (tmp_path / "demo_data").symlink_to(demo_dir / "demo_data")
    spec = demo(tmp_path, "run.name=dry")
    saved = checkpoint_of(spec, 2)
    argv = ["--spec", str(DEMO), "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", f"run.demo_data={tmp_path / 'demo_data'}",
            "--set", "run.name=dry", "--dry-run"]
    assert train_main()(argv) == 0
    out = capsys.readouterr().out
    assert f"# plan: DeepSpeed ZeRO-{spec.engine.zero_stage}, 1 rank(s)" in out and f"start: resume {saved}\n" in out
    assert train_main()([*argv, "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"start: resume {saved} through its universal conversion {spec.run.run_dir / 'universal' / saved.name}" in out
    assert '"load_universal": true' in out
    assert not (spec.run.run_dir / "universal").exists()  # planned, not converted
    assert train_main()([*argv, "--set", "data.datasets.laion.batch_size=3"]) == 0  # a launch would refuse it: said
    out = capsys.readouterr().out
    assert "# a launch with this spec now would stop before building anything" in out
    assert "#     - data.datasets.laion.batch_size: 8 -> 3 (refused" in out and "start: fresh (step 0)" in out
