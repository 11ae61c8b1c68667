"""End-to-end runs of launch/train.py's training (`of_ds.train.run.run`) on the demo data, 2 CPU ranks (gloo): every
ZeRO stage and offload config, DDP, FSDP2; trajectories compared; exact resume; export round-trip (ZeRO-2 and
ZeRO-3). The runs of this module share a few launches (`launch_runs`: every 2-rank run, the 1-rank ones, the NVMe
resumes), each run as one launch/train.py command would do it. Validation (loss, samples, the safetensors export) is
checked on the ZeRO-2, ZeRO-3, resumed and FSDP runs of the same launch.

fp32 tolerance: ZeRO-1/2/3 and FSDP reduce gradients in a different order (bucketed / reduce-scatter) than DDP's
all-reduce; over 4 steps of the demo model the logged losses agree to 2e-5 relative (we assert 1e-4)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engines_launch import job, launch, launch_runs, losses, val_losses

pytestmark = pytest.mark.slow

RTOL = 1e-4
KEYS = ("loss", "loss/laion", "loss/mmc4")
STEP2 = Path("checkpoints") / "step-00000002"
ZERO_CONFIGS = [  # (ds_config, sets) of test_zero_stage_matches_ddp
    ("zero0.json", []),
    ("zero1.json", ["engine.activation_checkpointing=true"]),
    ("zero2_offload.json", []),
    ("zero3_offload.json", ["engine.activation_checkpointing=true"]),
]
FUSED = [  # (ds_config, sets) of test_one_pass_for_both_datasets_matches_separate_passes
    ("zero2.json", []),
    ("zero3.json", ["engine.zero_stage=3", "engine.activation_checkpointing=true"]),
    (None, ["engine.kind=ddp"]),
    ("zero2.json", ["engine.compile=true", "engine.compile_targets=[loss]"]),
    ("zero3.json", ["engine.zero_stage=3", "engine.compile=true", "engine.compile_targets=[loss]"]),
]
# validation and samples at steps 2 and 4 (FAST turns them off elsewhere); short samples (ZeRO-3 gathers every
# module's weights for each generated token)
VAL = ["logging.eval_every_n_steps=2", "logging.sample_max_new_tokens=8"]
SCHED = ["optim.warmup_steps=2"]  # the demo's cosine with a warmup short enough to decay within 4 steps
STEP4 = Path("checkpoints") / "step-00000004"


def resume_policy_jobs(runs: Path) -> list[dict]:
    """A 4-step cosine run and what a user does with it next: resume with a new lr, extend it (twice), resume with
    another architecture, start afresh in its run dir (refused, then with the old run moved aside). Last in a
    launch: the fresh start takes the run dir over."""
    return [
        job("sched", SCHED, "zero2.json"),
        job("sched_lr", [*SCHED, "optim.lr=1e-3"], "zero2.json", copy=(runs / "sched" / STEP2, runs / "sched_lr" / STEP2)),
        job("sched_longer", [*SCHED, "run.max_steps=8"], "zero2.json", copy=(runs / "sched" / STEP4, runs / "sched_longer" / STEP4)),
        job("sched_longer_again", [*SCHED, "run.max_steps=8"], "zero2.json",
            copy=(runs / "sched_longer" / "checkpoints" / "step-00000006", runs / "sched_longer_again" / "checkpoints" / "step-00000006")),
        job("sched_arch", [*SCHED, "model.perceiver.depth=1"], "zero2.json", copy=(runs / "sched" / STEP2, runs / "sched_arch" / STEP2), expect_error=True),
        job("sched_never", [*SCHED, "run.name=sched", "checkpoint.resume=never"], "zero2.json", expect_error=True),
        job("sched_fresh", [*SCHED, "run.name=sched", "checkpoint.resume=never", "checkpoint.on_existing=move_aside", "run.max_steps=2"], "zero2.json"),
    ]


def lr_change_jobs(runs: Path) -> list[dict]:
    """A new optim.lr on resume under ZeRO-3 and DDP (their 4-step runs, still in the demo's 20-step warmup)."""
    return [
        job("zero3_lr", ["engine.zero_stage=3", "optim.lr=1e-3"], "zero3.json", copy=(runs / "zero3" / STEP2, runs / "zero3_lr" / STEP2)),
        job("ddp_lr_longer", ["engine.kind=ddp", "optim.lr=1e-3", "run.max_steps=6"], copy=(runs / "ddp" / STEP2, runs / "ddp_lr_longer" / STEP2)),
    ]


def fused_name(config, sets) -> str:
    return f"fused_{(config or 'ddp').removesuffix('.json')}" + ("_compiled_loss" if "engine.compile=true" in sets else "")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, link_demo_data):
    """The launch dir of this module's runs, holding the session's demo dataset."""
    d = tmp_path_factory.mktemp("launch")
    link_demo_data(d / "demo_data")
    return d


@pytest.fixture(scope="module")
def two_rank(workdir):
    """Every 2-rank run of this module, in one launch: name -> {"out", "err"}."""
    runs = workdir / "runs"
    jobs = [job("ddp", ["engine.kind=ddp"])]
    jobs += [job(c.removesuffix(".json"), [f"engine.zero_stage={c[4]}", *sets], c) for c, sets in ZERO_CONFIGS]
    jobs += [job("fsdp", ["engine.kind=fsdp", "logging.eval_every_n_steps=4"])]
    jobs += [job(fused_name(c, sets), [*sets, "engine.fuse_datasets=true"], c) for c, sets in FUSED]
    jobs += [
        job("zero3", ["engine.zero_stage=3", *VAL], "zero3.json"),
        job("zero2", VAL, "zero2.json"),
        job("resumed", VAL, "zero2.json", copy=(runs / "zero2" / STEP2, runs / "resumed" / STEP2)),
        job("zero3_from_zero2", ["engine.zero_stage=3"], "zero3.json", copy=(runs / "zero2" / STEP2, runs / "zero3_from_zero2" / STEP2), expect_error=True),
        *lr_change_jobs(runs),
        *resume_policy_jobs(runs),
    ]
    return launch_runs(workdir, jobs)


@pytest.fixture(scope="module")
def one_rank(workdir, two_rank):
    """The 1-rank runs that start from the 2-rank ones: resumes (through DeepSpeed's universal format) and
    weights-only starts, in one launch."""
    runs = workdir / "runs"
    start = [f"checkpoint.resume_from={runs / 'zero3' / STEP2}", "checkpoint.load_weights_only=true", "run.max_steps=1"]
    jobs = [
        job("zero2_one_rank", [], "zero2.json", copy=(runs / "zero2" / STEP2, runs / "zero2_one_rank" / STEP2)),
        job("zero3_one_rank", ["engine.zero_stage=3"], "zero3.json", copy=(runs / "zero3" / STEP2, runs / "zero3_one_rank" / STEP2)),
        job("zero3_weights", ["engine.zero_stage=3", *start], "zero3.json"),
        job("ddp_weights", ["engine.kind=ddp", *start]),
    ]
    return launch_runs(workdir, jobs, nproc=1)


@pytest.fixture(scope="module")
def ddp(workdir, two_rank):
    return losses(workdir, "ddp")


def assert_same_trajectory(got: dict, ref: dict, rtol: float = RTOL) -> None:
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        for k in KEYS:
            assert got[step][k] == pytest.approx(ref[step][k], rel=rtol), (step, k, got[step][k], ref[step][k])


def assert_repeats_steps_3_and_4(resumed: dict, full: dict) -> None:
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for k in KEYS:
            assert resumed[step][k] == full[step][k], (step, k)


def test_ddp_trains(ddp):
    assert all(ddp[s]["grad_norm"] > 0 for s in ddp)
    assert ddp[4]["lr"] > ddp[1]["lr"] == 0.0  # warmup from 0, counted in optimizer steps


@pytest.mark.parametrize("config,sets", ZERO_CONFIGS)
def test_zero_stage_matches_ddp(workdir, ddp, config, sets):
    name = config.removesuffix(".json")
    assert_same_trajectory(losses(workdir, name), ddp)
    assert (workdir / "runs" / name / "checkpoints" / "step-00000004" / "COMPLETE").is_file()


def test_fsdp_matches_ddp(workdir, ddp):
    assert_same_trajectory(losses(workdir, "fsdp"), ddp)


@pytest.mark.parametrize("config,sets", FUSED)
def test_one_pass_for_both_datasets_matches_separate_passes(workdir, ddp, two_rank, config, sets):
    """engine.fuse_datasets: LAION rows packed into MMC4-length rows, one model pass; same losses per dataset. Also
    with the loss compiled (engine.compile_targets [loss]) inside DeepSpeed."""
    name = fused_name(config, sets)
    assert_same_trajectory(losses(workdir, name), ddp)
    # the 4 LAION rows of 32 tokens share one 128-token row (4 image slots), then the 2 MMC4 rows (3 slots used)
    line = "engine.fuse_datasets: one pass of 3 rows x 128 tokens, 4 image slots a row: laion rows 0-0 (4 a row), mmc4 rows 1-2 (1 a row)"
    assert two_rank[name]["out"].count(line) == 1, two_rank[name]["out"][-3000:]


def test_zero3_matches_ddp(workdir, ddp):
    assert_same_trajectory(losses(workdir, "zero3"), ddp)


def test_zero2_matches_ddp_and_reports_where(workdir, ddp, two_rank):
    assert_same_trajectory(losses(workdir, "zero2"), ddp)
    out = two_rank["zero2"]["out"]
    assert "run dir:" in out and "metrics.jsonl" in out and "step-00000004" in out
    ckpts = sorted(p.name for p in (workdir / "runs" / "zero2" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002", "step-00000004"]


def test_exact_resume(workdir, two_rank):
    """Restart from the step-2 checkpoint of the 4-step run: steps 3-4 repeat exactly."""
    assert "resumed from" in two_rank["resumed"]["out"]
    assert_repeats_steps_3_and_4(losses(workdir, "resumed"), losses(workdir, "zero2"))


def lrs(workdir: Path, name: str) -> dict[int, float]:
    return {step: row["lr"] for step, row in losses(workdir, name).items()}


def old_run(workdir: Path, name: str) -> Path:
    (aside,) = (workdir / "runs").glob(f"{name}.old-*")
    return aside


def test_a_new_lr_takes_effect_from_the_resume_step(workdir, two_rank):
    """optim.lr 3e-3 -> 1e-3 on resume at step 2: steps 3-4 follow the same schedule at the new peak."""
    base = {s: r["lr"] for s, r in _rows(old_run(workdir, "sched")).items()}
    assert base == pytest.approx({1: 0.0, 2: 1.5e-3, 3: 3e-3, 4: 1.5e-3})
    assert lrs(workdir, "sched_lr") == pytest.approx({3: 1e-3, 4: 0.5e-3})
    out = two_rank["sched_lr"]["out"]
    assert "optim.lr: 0.003 -> 0.001 (takes effect: the schedule's new peak" in out
    assert "peak 0.003 -> 0.001; the next step's lr 0.001" in out


def test_a_new_lr_takes_effect_under_zero3_and_ddp(workdir, two_rank):
    """In the warmup (lr = peak x step/20 at step s+1) the resumed steps follow the new peak; DDP's run is also
    extended to 6 steps, which leaves a warmup's multipliers as they were."""
    assert lrs(workdir, "zero3") == pytest.approx({s: 3e-3 * (s - 1) / 20 for s in range(1, 5)})
    assert lrs(workdir, "zero3_lr") == pytest.approx({s: 1e-3 * (s - 1) / 20 for s in (3, 4)})
    assert lrs(workdir, "ddp_lr_longer") == pytest.approx({s: 1e-3 * (s - 1) / 20 for s in range(3, 7)})


def test_more_steps_continue_the_decay_without_a_jump(workdir, two_rank):
    """run.max_steps 4 -> 8 on the finished cosine run: the lr goes on down from the last step's (1.5e-3) to 0 at
    step 8, never back up; the continued schedule is in the checkpoints (a second resume at step 6 repeats it)."""
    import math

    got = lrs(workdir, "sched_longer")
    want = {k: 3e-3 * 0.5 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 5)) for k in range(5, 9)}
    assert got == pytest.approx(want)
    assert all(a > b for a, b in zip([1.5e-3, *got.values()], got.values()))
    assert "lr schedule at step 4: continues from the last step's multiplier 0.5" in two_rank["sched_longer"]["out"]
    assert "run.max_steps: 4 -> 8 (takes effect" in two_rank["sched_longer"]["out"]
    again, first = losses(workdir, "sched_longer_again"), losses(workdir, "sched_longer")
    assert {s: r["lr"] for s, r in again.items()} == pytest.approx({7: want[7], 8: want[8]})
    assert_repeats(again, first, (7, 8))
    assert "lr schedule at step 6: unchanged" in two_rank["sched_longer_again"]["out"]


def test_an_architecture_change_is_refused_naming_the_field(two_rank):
    err = two_rank["sched_arch"]["err"]
    assert err.startswith("SpecError: ") and "model.perceiver.depth: 2 -> 1 (refused" in err
    assert "resumed from" not in two_rank["sched_arch"]["out"]


def test_a_fresh_start_never_mixes_runs(workdir, two_rank):
    """resume=never on the sched run's dir: refused naming the dir and the flag; with on_existing=move_aside the
    old run is moved whole, and the run dir holds the new run's history only (metrics, checkpoints, latest, summary)."""
    err = two_rank["sched_never"]["err"]
    assert f"the run dir {Path('runs') / 'sched'} already holds a run" in err and "checkpoint.on_existing" in err
    run_dir, aside = workdir / "runs" / "sched", old_run(workdir, "sched")
    assert sorted(_rows(aside)) == [1, 2, 3, 4] and (aside / STEP4 / "COMPLETE").is_file()
    fresh = _rows(run_dir)
    assert sorted(fresh) == [1, 2]
    assert_repeats(fresh, _rows(aside), (1, 2))  # the same seed: the same first steps
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    out = two_rank["sched_fresh"]["out"]
    assert f"aside to {Path('runs') / aside.name}" in out and "(latest: step-00000002)" in out


def _rows(run_dir: Path) -> dict[int, dict]:
    import json

    return {r["step"]: r for r in (json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip())}


def assert_repeats(got: dict, ref: dict, steps) -> None:
    assert sorted(got) == list(steps)
    for s in steps:
        for k in KEYS:
            assert got[s][k] == pytest.approx(ref[s][k], rel=1e-6), (s, k)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_resume_on_fewer_ranks(workdir, one_rank, run):
    """A 2-rank ZeRO checkpoint resumed by 1 rank: launch/train.py converts it once to DeepSpeed's universal format
    and loads that, and the run goes on from step 2 (the data restarts its epoch: loader positions belong to the
    world size that saved them). That the weights load exactly: tests/multinode/test_train.py."""
    name = f"{run}_one_rank"
    out = one_rank[name]["out"]
    universal = workdir / "runs" / name / "universal" / STEP2.name
    assert "through its universal conversion " in out and f"{name}/universal/{STEP2.name}" in out, out[-3000:]
    assert "no loader positions for this world size" in out
    assert not universal.parent.exists()  # removed once the run saved a checkpoint of its own
    resumed = losses(workdir, name)
    assert sorted(resumed) == [3, 4] and all(torch.isfinite(torch.tensor(resumed[s]["loss"])) for s in (3, 4))
    assert resumed[3]["lr"] == losses(workdir, run)[3]["lr"]  # the scheduler's state came along
    assert '"world_size": 1' in (workdir / "runs" / name / "checkpoints" / "step-00000004" / "meta.json").read_text()


@pytest.mark.parametrize("target", ["zero3", "ddp"])
def test_weights_only_from_an_older_step_on_fewer_ranks(workdir, one_rank, monkeypatch, target):
    """checkpoint.load_weights_only from the 2-rank ZeRO-3 run's step 2 (step 4 is its newest) on 1 rank, into ZeRO-3
    or another engine: no conversion, the weights of step 2 exactly (after a first step at warmup's lr 0 they are
    still those), step 1."""
    from of_ds.train.export import export_checkpoint

    src = workdir / "runs" / "zero3" / STEP2
    assert (src.parent / "step-00000004").is_dir()
    name = f"{target}_weights"
    out = one_rank[name]["out"]
    assert "universal" not in out and sorted(losses(workdir, name)) == [1]
    assert f"started from the weights of {src}" in out
    assert losses(workdir, name)[1]["lr"] == 0.0
    monkeypatch.chdir(workdir)  # the saved spec's paths (demo_data/lm) are relative to the launch dir
    want, got = (torch.load(export_checkpoint(d, workdir / f"{n}.pt", layout="ours"), map_location="cpu")
                 for n, d in (("z3_step2", src), (name, workdir / "runs" / name)))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_under_another_zero_family_is_a_clear_error(two_rank):
    assert "saved under ZeRO stage 2 and this run uses stage 3" in two_rank["zero3_from_zero2"]["err"]


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_export_round_trip(workdir, ddp, run, monkeypatch):
    """tools/export_checkpoint -> original key layout -> loads into a fresh model equal to the checkpoint's weights;
    ZeRO-3 partitions and ZeRO-2 give the same export as the torch engine's for the same trajectory."""
    from of_ds.train.restore import load_original_checkpoint
    from of_ds.train.export import export_checkpoint, find_checkpoint, load_checkpoint_into_model

    monkeypatch.chdir(workdir)  # the saved spec's paths (demo_data/tokenizer) are relative to the launch dir
    out = export_checkpoint(workdir / "runs" / run, workdir / f"{run}.pt")
    sd = torch.load(out, map_location="cpu")
    assert any(".gated_cross_attn_layer." in k for k in sd) and any(k.startswith("perceiver.") for k in sd)
    assert not any(k.startswith("vision_encoder.") or "new_tokens" in k for k in sd)
    model, spec = load_checkpoint_into_model(find_checkpoint(workdir / "runs" / run))
    from of_ds.model import build_flamingo

    torch.manual_seed(123)  # a different init: every trainable weight must come from the file
    fresh, _, _ = build_flamingo(spec.model)
    load_original_checkpoint(fresh, out)  # what checkpoint.resume_from=<checkpoint.pt> does
    want, got = model.trainable_state_dict(), fresh.trainable_state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    ddp_export = torch.load(export_checkpoint(workdir / "runs" / "ddp", workdir / "ddp.pt"), map_location="cpu")
    for k in sd:
        torch.testing.assert_close(sd[k], ddp_export[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_safetensors_export_gives_the_pt_exports_logits(workdir, run, monkeypatch, capsys):
    """tools/export_checkpoint --format safetensors: the .pt export's tensors, and tools/generate builds the model
    from either file without --spec (the spec beside the .pt; inside the safetensors file, its sidecar removed)."""
    from of_ds.generate_cli import build_from_checkpoint, main as generate
    from of_ds.model import image_processor_config
    from of_ds.spec import RunSpec
    from of_ds.train.export import main as export, spec_beside
    from of_ds.data.held_out import held_out_batches

    monkeypatch.chdir(workdir)
    pt, st = workdir / f"{run}_export.pt", workdir / f"{run}_export.safetensors"
    assert export([str(workdir / "runs" / run), str(pt)]) == 0
    assert export([str(workdir / "runs" / run), str(st), "--format", "safetensors"]) == 0
    model_pt, _, tok = build_from_checkpoint(pt, None, [])  # the spec beside it
    spec_beside(st).unlink()  # the safetensors file carries the spec itself
    model_st, _, _ = build_from_checkpoint(st, None, [])
    want, got = model_pt.trainable_state_dict(), model_st.trainable_state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    spec = RunSpec.from_yaml(workdir / "runs" / run / STEP2 / "spec.yaml")
    b = next(held_out_batches(spec.dataset("mmc4"), spec.run.seed, tok, image_processor_config(model_pt), 0, 2))
    with torch.no_grad():
        logits = [m.eval()(b["pixel_values"], b["input_ids"], b["attention_mask"], num_images=tuple(b["num_images"].tolist())).logits
                  for m in (model_pt, model_st)]
    assert torch.equal(logits[0], logits[1])
    capsys.readouterr()
    assert generate([str(st), "--image", str(workdir / "demo_data" / "photos" / "chelsea.jpg"), "--max-new-tokens", "4",
                     "--num-beams", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


# ------------------------------------------------------------------------------------------------------ validation
def checkpoint_model(step_dir: Path):
    """-> (model in eval mode, spec, tokenizer, image config) of a checkpoint, in one process."""
    from of_ds.model import image_processor_config
    from of_ds.model.tokenizer import load_tokenizer
    from of_ds.train.export import load_checkpoint_into_model

    model, spec = load_checkpoint_into_model(step_dir)
    tok = load_tokenizer(spec.model.tokenizer, offline=True)
    return model.eval(), spec, tok, image_processor_config(model)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_validation_loss_equals_a_one_process_evaluation(workdir, two_rank, run, monkeypatch):
    """At steps 2 and 4 (ZeRO-3: 4) the logged validation loss of each dataset is the token mean, over both ranks'
    held-out batches, of the loss of the checkpoint saved at that step evaluated here in one process; perplexity its
    exp; val/loss the loss_weight sum."""
    from of_ds.data.held_out import held_out_batches
    from of_ds.train.validate import target_count

    monkeypatch.chdir(workdir)
    rows = val_losses(workdir, run)
    assert sorted(rows) == [2, 4]
    assert f"step 4/4 | val loss {rows[4]['val/loss']:.4f} | laion " in two_rank[run]["out"]
    for step in (2, 4) if run == "zero2" else (4,):
        model, spec, tok, cfg = checkpoint_model(workdir / "runs" / run / "checkpoints" / f"step-{step:08d}")
        row, weighted = rows[step], 0.0
        for ds in spec.data.datasets:
            total, targets = 0.0, 0
            with torch.no_grad():
                for rank in (0, 1):
                    for b in held_out_batches(ds, spec.run.seed, tok, cfg, rank, 2):
                        n = target_count(b)
                        loss = model(b["pixel_values"], b["input_ids"], b["attention_mask"], labels=b["labels"],
                                     num_images=tuple(b["num_images"].tolist())).loss
                        total, targets = total + float(loss) * n, targets + n
            assert row[f"val/tokens/{ds.name}"] == targets > 0
            assert row[f"val/loss/{ds.name}"] == pytest.approx(total / targets, rel=1e-5), (step, ds.name)
            assert row[f"val/ppl/{ds.name}"] == pytest.approx(torch.tensor(row[f"val/loss/{ds.name}"]).exp().item(), rel=1e-6)
            weighted += ds.loss_weight * row[f"val/loss/{ds.name}"]
        assert row["val/loss"] == pytest.approx(weighted, rel=1e-12)
    meta = json.loads((workdir / "runs" / run / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert meta["val_loss"] == rows[4]["val/loss"]


def test_validation_is_deterministic_across_a_resume_and_engines(workdir, two_rank):
    """The run resumed at step 2 evaluates at step 4 exactly as the uninterrupted one (loss and samples); ZeRO-3 and
    FSDP evaluate the same weights to fp32 rounding; evaluating does not change the training trajectory."""
    full, resumed = val_losses(workdir, "zero2"), val_losses(workdir, "resumed")
    assert sorted(resumed) == [4]
    assert {k: v for k, v in resumed[4].items() if k != "eval_s"} == {k: v for k, v in full[4].items() if k != "eval_s"}
    samples = [(workdir / "runs" / r / "samples" / "step-00000004.jsonl").read_text() for r in ("zero2", "resumed")]
    assert samples[0] == samples[1]
    for other in ("zero3", "fsdp"):
        got = val_losses(workdir, other)[4]
        for k in ("val/loss", "val/loss/laion", "val/loss/mmc4"):
            assert got[k] == pytest.approx(full[4][k], rel=RTOL), (other, k)
    assert sorted(val_losses(workdir, "fsdp")) == [4] and (workdir / "runs" / "fsdp" / "samples" / "step-00000004.jsonl").is_file()


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_samples_come_from_the_model(workdir, two_rank, run, monkeypatch):
    """samples/step-N.jsonl: 4 greedy captions and one interleaved continuation, the ones this checkpoint's model
    gives in one process; opening the cross-attention gates changes them. tools/plot_run's page shows them."""
    from of_ds.train.plot import samples_page
    from of_ds.train.samples import SampleSet

    monkeypatch.chdir(workdir)
    folder = workdir / "runs" / run / "samples"
    assert sorted(p.name for p in folder.glob("step-*.jsonl")) == ["step-00000002.jsonl", "step-00000004.jsonl"]
    records = [json.loads(line) for line in (folder / "step-00000004.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["caption"] * 4 + ["interleaved"]
    assert all((folder / name).is_file() for r in records for name in r["images"]) and len(records[-1]["images"]) >= 2
    assert all(r["prompt"] == "<image>" and r["reference"] for r in records[:4])
    model, spec, tok, cfg = checkpoint_model(workdir / "runs" / run / "checkpoints" / "step-00000004")
    samples = SampleSet.build(spec, tok, cfg, workdir / "unused", SimpleNamespace(device=torch.device("cpu")))
    outputs = [r["output"] for r in records]
    with torch.no_grad():
        assert [r["output"] for r in samples.generate(model, 4)] == outputs
        for block in model.cross_attention_blocks():
            block.attn_gate.fill_(1.0), block.ff_gate.fill_(1.0)
        assert [r["output"] for r in samples.generate(model, 4)] != outputs
    page = samples_page(workdir / "runs" / run).read_text()
    assert all(html.escape(o) in page for o in outputs) and "samples/images/0-0.jpg" in page


def test_dry_run_prints_counts_config_and_recommendation(workdir):
    proc = launch(workdir, "python", "dry", ["engine.zero_stage=3"], ds_config="zero3.json",
                  extra=["--dry-run", "--gpu-memory", "2GiB"])
    out = proc.stdout
    assert '"stage": 3' in out and '"train_micro_batch_size_per_gpu": 6' in out
    assert "# parameters: total" in out and "trainable" in out
    assert "ZeRO-3" in out and "recommended for 2.0 GiB per GPU" in out
    assert not (workdir / "runs" / "dry").exists()  # nothing trained, nothing written


def test_conflicting_ds_config_is_a_clear_error(workdir):
    proc = launch(workdir, "python", "conflict", ["engine.zero_stage=2"], ds_config="zero3.json", check=False, extra=["--dry-run"])
    assert proc.returncode != 0
    assert "zero_optimization.stage is 3" in proc.stderr and "engine.zero_stage is 2" in proc.stderr


NAN_KINDS = ["deepspeed", "deepspeed:bf16", "ddp"]
OVERFLOW_MODES = ["device", "dropped", "kept", "z2fp32", "z0fp32", "z0bf16"]
SYNC_KINDS = ["deepspeed:bf16:mpt", "ddp:bf16:mpt", "ddp:fp32:mpt", "deepspeed:bf16", "deepspeed:bf16:mpt:fused", "deepspeed:bf16:fused"]


@pytest.fixture(scope="module")
def driver_runs(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """The step drivers' runs (nan, overflow, sync: tests/engines/engines_*_driver.py), every mode of each, in one
    2-rank torchrun launch; -> the folder holding each driver's."""
    import subprocess

    from engines_launch import BIN, REPO, env, free_port

    out = tmp_path_factory.mktemp("drivers")
    runs = [f"nan={','.join(NAN_KINDS)}", f"overflow={','.join(OVERFLOW_MODES)}", f"sync={','.join(SYNC_KINDS)}"]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "engines" / "engines_drivers.py"), tiny_tokenizer_dir, str(out), *runs]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("kind", NAN_KINDS)
def test_nan_on_one_rank_skips_on_every_rank(driver_runs, kind):
    """Bug B6: a rank-local NaN must not desync ranks; both skip the same step and keep identical weights."""
    import json

    r0, r1 = (json.loads((driver_runs / "nan" / f"{kind.replace(':', '-')}-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == [False, True, False]
    assert r0["checksum"] == r1["checksum"]


def test_a_nan_gradient_is_skipped_on_every_path(driver_runs):
    """ZeRO-2 bf16 leaves the inf/NaN decision to the fused optimizer (`found_inf`: no host sync per step); the
    host paths remain for unfused optimizers (DeepSpeed's own check, its per-tensor scan dropped or kept), fp32, and
    ZeRO-0 (of_ds reads the norm). A NaN gradient from a finite loss on one rank must skip that step on both ranks,
    on every path: no weight and no Adam step count changes, and the learning-rate schedule moves on alike."""
    import json

    modes, out = OVERFLOW_MODES, driver_runs / "overflow"
    runs = {(m, r): json.loads((out / f"{m}-rank{r}.json").read_text()) for m in modes for r in (0, 1)}
    assert runs["device", 0]["path"] == {"device_skip": True, "sync_free_clip": True, "scan_dropped": False, "foreach_norm": True}
    assert runs["dropped", 0]["path"] == {"device_skip": False, "sync_free_clip": False, "scan_dropped": True, "foreach_norm": True}
    assert runs["kept", 0]["path"] == {"device_skip": False, "sync_free_clip": False, "scan_dropped": False, "foreach_norm": False}
    assert runs["z2fp32", 0]["path"]["foreach_norm"] and not any(runs[m, 0]["path"]["device_skip"] for m in ("z2fp32", "z0fp32", "z0bf16"))
    # the first step's gradients are the same on the bf16 paths: the fp32 foreach norm equals DeepSpeed's fp64 one
    for m in ("device", "dropped"):
        assert runs[m, 0]["norms"][0] == pytest.approx(runs["kept", 0]["norms"][0], rel=1e-6), m
    assert all(run["norms"][1] == float("inf") for (m, r), run in runs.items() if m != "z0fp32" and m != "z0bf16")
    for m in modes:
        run = runs[m, 0]
        assert run["skipped"] == runs[m, 1]["skipped"] == [False, True, False], m
        c = run["checksums"]
        assert c == runs[m, 1]["checksums"], m  # ranks agree
        assert c[1] == c[0] and c[2] != c[1], m  # the NaN step changed no weight; the next one did
        assert run["adam_steps"] == [2], m  # nor Adam's step count
        assert run["lrs"] == runs["device", 0]["lrs"], m  # the schedule counts the skipped step on every path
    # fused and unfused AdamW (and the two norms, through the clip) round differently, and bf16 weights show it
    for m in ("device", "dropped"):
        assert runs[m, 0]["checksums"] == pytest.approx(runs["kept", 0]["checksums"], rel=1e-3), m


# reads of the loader's host tensors, made on purpose (no device involved on a GPU either)
HOST_READS = {"flamingo.py:encode_images:nonzero", "metrics.py:observe:__int__", "base.py:_as_ints:tolist"}
FUSED_HOST_READS = {"packing.py:_image_slots:nonzero", "packing.py:_image_slots:__bool__", "packing.py:_image_slots:cpu", "metrics.py:observe:__int__"}


# transformers' SDPA mask builder (llama, qwen, ...) reads the padding mask back to choose `is_causal`; MPT's does not
SDPA_MASK_READ = "masking_utils.py:_ignore_causal_mask_sdpa:__bool__"


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_a_training_step_makes_no_host_sync(driver_runs, kind):
    """No per-step host-device sync outside log and checkpoint steps. Every tensor read a GPU would wait
    for (item, bool, float, ... on a tensor) during a plain step of train_loop, 2 ranks, is recorded by call site;
    only the reads of host-side loader tensors may remain (and, with a llama-family LM, transformers' mask read)."""
    import json

    for rank in (0, 1):
        sites = json.loads((driver_runs / "sync" / f"{kind.replace(':', '-')}-rank{rank}.json").read_text())
        if kind.endswith(":fused"):  # one pass: the LM gets a 4D mask, so transformers' SDPA mask read goes too
            assert set(sites) <= FUSED_HOST_READS, sites
            assert sites.get("packing.py:_image_slots:nonzero", 0) == 2  # one per dataset: the recording did run
            continue
        assert set(sites) <= HOST_READS | ({SDPA_MASK_READ} if not kind.endswith(":mpt") else set()), sites
        assert sites.get("flamingo.py:encode_images:nonzero", 0) == 2  # one per dataset: the recording did run
