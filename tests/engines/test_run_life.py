"""A run's life on 2 CPU ranks (DeepSpeed ZeRO-2, the demo data): launch/train.py under the deepspeed launcher is
sent SIGTERM mid-run, to rank 1 alone (a signal that reaches some ranks only) or to DeepSpeed's launcher (`kill` as
users send it); every rank stops at a checkpoint, and the resume repeats an uninterrupted run exactly. The runs log
to wandb (offline) and TensorBoard and keep RUN_DIR/train.log and RUN_DIR/summary.json, all checked on disk.

Three launches: the two signalled ones, then the uninterrupted reference and both resumes in one `launch_runs`."""

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
# loader workers too: a signal to the process tree reaches them, and they must not die of it
SETS = [f"run.max_steps={STEPS}", "checkpoint.every_n_steps=5", "checkpoint.keep_last=5",
        "data.datasets.laion.workers=2", "data.datasets.mmc4.workers=2"]
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


def run_and_signal(workdir: Path, name: str, to: str) -> dict:
    """Run NAME under the deepspeed launcher and, once step SIGNAL_AT is logged, SIGTERM `to`: "rank1" (its pid
    from RUN_DIR/ranks/rank1.json) or "launcher" (the launcher's `python -m deepspeed.launcher.launch`, which
    forwards it). -> what the stopped run left: returncode, seconds from the signal to the exit, output, summary,
    complete checkpoints, metrics rows."""
    import psutil

    run_dir = workdir / "runs" / name
    cmd = launch_command("deepspeed", name, [*SETS, *TRACKING], "zero2.json")
    proc = subprocess.Popen(cmd, cwd=workdir, env={**env(), "WANDB_SILENT": "true"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, sent = time.monotonic() + 600, None
    try:
        while sent is None and proc.poll() is None and time.monotonic() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and any(r["step"] >= SIGNAL_AT for r in rows_of(metrics)):
                if to == "rank1":
                    pid = json.loads((run_dir / "ranks" / "rank1.json").read_text())["pid"]
                else:
                    (launcher,) = [p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
                    pid = launcher.pid
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
def signalled(workdir):
    """`sig`: SIGTERM to rank 1 alone; `sig_launcher`: SIGTERM to DeepSpeed's per-node launcher (`kill` as users
    send it), which forwards it to every rank's process tree, wandb's service process included."""
    return {"sig": run_and_signal(workdir, "sig", "rank1"), "sig_launcher": run_and_signal(workdir, "sig_launcher", "launcher")}


@pytest.fixture(scope="module")
def resumed(workdir, signalled):
    """The uninterrupted reference `ref` and the resumes of the signalled runs, in one launch."""
    return launch_runs(workdir, [job("ref", SETS, "zero2.json"), *(job(name, [*SETS, *TRACKING], "zero2.json") for name in signalled)])


def assert_stopped_at_a_checkpoint(stopped: dict) -> int:
    """-> the step it stopped at: mid-run, after the signal, checkpointed (COMPLETE) and logged."""
    stop = stopped["summary"]["step"]
    assert stopped["seconds"] < STOP_WITHIN_S
    assert SIGNAL_AT <= stop < STEPS
    assert f"step-{stop:08d}" in stopped["checkpoints"]
    assert [r["step"] for r in stopped["rows"]] == list(range(1, stop + 1))  # the stop step is logged too
    return stop


def test_sigterm_to_one_rank_stops_every_rank_at_a_checkpoint_and_exits_0(signalled):
    stopped = signalled["sig"]
    stop = assert_stopped_at_a_checkpoint(stopped)
    assert stopped["rc"] == 0, stopped["out"][-4000:]  # every rank exited 0: DeepSpeed's launch.py exits 0 then
    assert (stopped["summary"]["stopped"], stopped["summary"]["detail"]) == ("signal", f"received by another rank; checkpoint at step {stop}")


def test_sigterm_to_deepspeeds_launcher_stops_at_a_checkpoint_although_wandb_goes(signalled):
    """DeepSpeed's launch.py SIGTERMs each rank's process tree in turn (rank 0 first, waiting for it) and exits 1
    itself. The loader workers in the trees ignore it; wandb's service process, a child of rank 0, ends with it:
    logging goes on without wandb."""
    stopped = signalled["sig_launcher"]
    stop = assert_stopped_at_a_checkpoint(stopped)
    assert stopped["rc"] == 1, stopped["out"][-4000:]
    assert (stopped["summary"]["stopped"], stopped["summary"]["detail"]) == ("signal", f"SIGTERM; checkpoint at step {stop}")
    assert "[of_ds] wandb stopped logging (ConnectionResetError" in stopped["out"]


@pytest.mark.parametrize("name", ["sig", "sig_launcher"])
def test_the_resume_repeats_the_uninterrupted_run(workdir, signalled, resumed, name):
    """Every step's losses after the SIGTERM stop and resume equal the uninterrupted run's; no step is logged twice."""
    stop = signalled[name]["summary"]["step"]
    assert f"resumed from {Path('runs', name, 'checkpoints', f'step-{stop:08d}')} at step {stop}" in resumed[name]["out"]
    rows, ref = rows_of(workdir / "runs" / name / "metrics.jsonl"), losses(workdir, "ref")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) == sorted(ref)
    for row in rows:
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
    assert s["this_start"]["from_step"] == signalled["sig"]["summary"]["step"]
    assert s["this_start"]["steps"] == STEPS - signalled["sig"]["summary"]["step"] and s["this_start"]["wall_s"] > 0
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


@pytest.mark.parametrize("name", ["sig", "sig_launcher"])
def test_wandb_offline_continues_the_same_run(workdir, resumed, name):
    run_dir = workdir / "runs" / name
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
    stop = signalled["sig"]["summary"]["step"]
    assert log.count("a start on 2 rank(s)") == 2
    assert f"step 1/{STEPS} | loss" in log and f"step {STEPS}/{STEPS} | loss" in log
    assert f"[rank 1] [of_ds] SIGTERM received: stopped at step {stop}, checkpoint saved" in log
    assert "[of_ds] stopped:     signal" in log and "[of_ds] stopped:     run.max_steps reached" in log
    assert not any(line.startswith("[rank 1] step ") for line in log.splitlines())  # rank 1's stdout stays out
