"""A run's life on 2 CPU ranks (DeepSpeed ZeRO-2, the demo data): launch/train.py under the deepspeed launcher is
sent SIGTERM mid-run (to rank 1 alone: a signal that reaches some ranks only), stops every rank at a checkpoint and
exits 0; its resume then repeats an uninterrupted run exactly. The run logs to wandb (offline) and TensorBoard and
keeps RUN_DIR/train.log and RUN_DIR/summary.json, all checked on disk.

Two launches: the signalled one, then the uninterrupted reference and the resume in one `launch_runs`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engines_launch import env, job, launch_command, launch_runs, losses

pytestmark = pytest.mark.slow

STEPS = 12
SETS = [f"run.max_steps={STEPS}", "checkpoint.every_n_steps=5", "checkpoint.keep_last=5"]
TRACKING = ["logging.wandb.mode=offline", "logging.tensorboard=true"]
SIGNAL_AT = 2  # rank 1 gets SIGTERM once this step's row is in metrics.jsonl
STOP_WITHIN_S = 60  # from the signal to the launcher's exit (a demo step takes well under a second)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, link_demo_data):
    d = tmp_path_factory.mktemp("life")
    link_demo_data(d / "demo_data")
    return d


@pytest.fixture(scope="module")
def signalled(workdir):
    """Run `sig` under the deepspeed launcher and SIGTERM its rank 1 once step SIGNAL_AT is logged.
    -> what the stopped run left: returncode, seconds from the signal to the exit, output, summary, checkpoints."""
    run_dir = workdir / "runs" / "sig"
    cmd = launch_command("deepspeed", "sig", [*SETS, *TRACKING], "zero2.json")
    proc = subprocess.Popen(cmd, cwd=workdir, env={**env(), "WANDB_SILENT": "true"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, sent = time.monotonic() + 600, None
    try:
        while sent is None and proc.poll() is None and time.monotonic() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and any(r["step"] >= SIGNAL_AT for r in rows_of(metrics)):
                pid = json.loads((run_dir / "ranks" / "rank1.json").read_text())["pid"]
                os.kill(pid, signal.SIGTERM)
                sent = time.monotonic()
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=STOP_WITHIN_S * 5)
    finally:
        if proc.poll() is None:  # a failed test: the launcher, its launch.py and the ranks (one process group)
            os.killpg(proc.pid, signal.SIGKILL)
    assert sent is not None, f"the run ended before step {SIGNAL_AT} was logged:\n{out[-4000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"rc": proc.returncode, "seconds": time.monotonic() - sent, "out": out, "summary": summary,
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()),
            "rows": rows_of(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def resumed(workdir, signalled):
    """The uninterrupted reference `ref` and the resume of `sig`, in one launch."""
    return launch_runs(workdir, [job("ref", SETS, "zero2.json"), job("sig", [*SETS, *TRACKING], "zero2.json")])


def test_sigterm_to_one_rank_stops_every_rank_at_a_checkpoint_and_exits_0(signalled):
    s = signalled["summary"]
    stop = s["step"]
    assert signalled["rc"] == 0, signalled["out"][-4000:]
    assert signalled["seconds"] < STOP_WITHIN_S
    assert SIGNAL_AT <= stop < STEPS  # stopped mid-run, at a step after the signal
    assert f"step-{stop:08d}" in signalled["checkpoints"]  # a complete checkpoint (COMPLETE written) of that step
    assert [r["step"] for r in signalled["rows"]] == list(range(1, stop + 1))  # the stop step is logged too
    assert (s["stopped"], s["detail"]) == ("signal", f"received by another rank; checkpoint at step {stop}")
    assert "received by another rank" in signalled["out"]


def test_the_resume_repeats_the_uninterrupted_run(workdir, signalled, resumed):
    """Every step's losses after the SIGTERM stop and resume equal the uninterrupted run's; no step is logged twice."""
    stop = signalled["summary"]["step"]
    assert f"resumed from {workdir / 'runs' / 'sig' / 'checkpoints' / f'step-{stop:08d}'}" in resumed["sig"]["out"]
    sig, ref = rows_of(workdir / "runs" / "sig" / "metrics.jsonl"), losses(workdir, "ref")
    assert [r["step"] for r in sig] == list(range(1, STEPS + 1)) == sorted(ref)
    for row in sig:
        for k in ("loss", "loss/laion", "loss/mmc4", "lr", "samples_seen/laion", "tokens_seen/laion", "tokens_seen/mmc4"):
            assert row[k] == ref[row["step"]][k], (row["step"], k)


def test_the_summary_matches_metrics_jsonl(workdir, signalled, resumed):
    """summary.json (and the printed summary) of the resumed run: steps, final and best loss per dataset, samples and
    tokens seen (over both starts: equal to the uninterrupted run's), drops, why it stopped, paths."""
    run_dir = workdir / "runs" / "sig"
    s = json.loads((run_dir / "summary.json").read_text())
    rows = rows_of(run_dir / "metrics.jsonl")
    last = rows[-1]
    assert (s["stopped"], s["step"], s["total_steps"], s["skipped_steps"]) == ("max_steps", STEPS, STEPS, last["skipped_steps"])
    assert s["this_start"]["from_step"] == signalled["summary"]["step"]
    assert s["this_start"]["steps"] == STEPS - signalled["summary"]["step"] and s["this_start"]["wall_s"] > 0
    for key in ("loss", "loss/laion", "loss/mmc4"):
        best = min(rows, key=lambda r: r[key])
        assert s["loss"][key] == {"final": last[key], "final_step": STEPS, "best": best[key], "best_step": best["step"]}
    for name in ("laion", "mmc4"):
        assert s["samples_seen"][name] == last[f"samples_seen/{name}"] > 0
        assert s["tokens_seen"][name] == last[f"tokens_seen/{name}"] > 0
    ref = json.loads((workdir / "runs" / "ref" / "summary.json").read_text())
    assert (s["samples_seen"], s["tokens_seen"], s["dropped"]) == (ref["samples_seen"], ref["tokens_seen"], ref["dropped"])
    assert s["dropped_counted_on"] == "every rank" and sum(s["dropped"]["mmc4"].values()) >= last["dropped"]["mmc4"]
    assert s["paths"]["latest_checkpoint"] == str((run_dir / "checkpoints" / f"step-{STEPS:08d}").resolve())
    out = resumed["sig"]["out"]
    assert "[of_ds] stopped:     run.max_steps reached" in out
    assert f"[of_ds] laion loss:  final {last['loss/laion']:.4f} (step {STEPS})" in out
    assert f"{s['tokens_seen']['mmc4']:,} tokens" in out


def test_wandb_offline_continues_the_same_run(workdir, resumed):
    run_dir = workdir / "runs" / "sig"
    run_id = (run_dir / "wandb_id").read_text().strip()
    starts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(p.name.endswith(f"-{run_id}") for p in starts), starts
    assert json.loads((run_dir / "summary.json").read_text())["paths"]["wandb_id"] == run_id


def test_tensorboard_has_every_row_and_the_spec(workdir, resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = workdir / "runs" / "sig"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per start
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = rows_of(run_dir / "metrics.jsonl")
    for key in ("loss", "loss/mmc4", "lr", "tokens_seen/laion"):
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6), key
    spec_texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("spec/text_summary")]
    assert len(spec_texts) == 2 and all("name: sig" in t and "max_steps: 12" in t for t in spec_texts)


def test_train_log_holds_the_console_and_other_ranks_warnings(workdir, signalled, resumed):
    log = (workdir / "runs" / "sig" / "train.log").read_text()
    stop = signalled["summary"]["step"]
    assert log.count("a start on 2 rank(s)") == 2
    assert f"step 1/{STEPS} | loss" in log and f"step {STEPS}/{STEPS} | loss" in log
    assert f"[rank 1] [of_ds] SIGTERM received: stopped at step {stop}, checkpoint saved" in log
    assert "[of_ds] stopped:     signal" in log and "[of_ds] stopped:     run.max_steps reached" in log
    assert not any(line.startswith("[rank 1] step ") for line in log.splitlines())  # rank 1's stdout stays out
