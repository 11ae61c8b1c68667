"""Two loopback "nodes" (pdsh, ZeRO-2, gloo): the real trainer trains, checkpoints, resumes, compares, loses rank 1;
a tiny ZeRO-2 job (tiny_ds_job.py), small enough to kill rank 0 cheaply, loses rank 0."""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, free_port
from .launch import DEMO_SPEC, deepspeed_cmd, run_launcher, train_sets

TRAIN = REPO / "launch" / "train.py"
TINY = Path(__file__).with_name("tiny_ds_job.py")
pytestmark = pytest.mark.slow
LAUNCH_TIMEOUT_S = 420  # the first launch may JIT-build DeepSpeed's shm op and generate the demo data


def _train_args(data: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    args = ["--deepspeed_config", str(REPO / "ds_configs" / "zero2.json"), "--spec", str(DEMO_SPEC)]
    for s in train_sets(data, out, max_steps, *extra):
        args += ["--set", s]
    return args


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _run(cluster, data, tmp_path, name, out, max_steps, *extra, local=False, nproc=2):
    cmd = deepspeed_cmd(None if local else cluster, free_port(), TRAIN, _train_args(data, out, max_steps, *extra))
    if local and nproc != 2:
        cmd[cmd.index("--num_gpus") + 1] = str(nproc)
    return run_launcher(cmd, cluster.workdir, cluster.env(), LAUNCH_TIMEOUT_S, tmp_path / f"{name}.log")


def _assert_complete(step_dir: Path, world: int) -> None:
    assert (step_dir / "COMPLETE").is_file(), sorted(os.listdir(step_dir))
    assert json.loads((step_dir / "meta.json").read_text())["world_size"] == world
    shards = sorted(p.name for p in step_dir.glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]  # one per rank
    for pt in step_dir.rglob("*.pt"):
        torch.load(pt, map_location="cpu", weights_only=False)


def test_two_nodes_train_resume_and_match_one_node(loopback_cluster, demo_data_dir, slurm_run, tmp_path):
    # the first 2 steps on two nodes: launch/slurm_train.sh's run (test_slurm.py), resumed here over pdsh
    assert slurm_run.rc == 0, slurm_run.output[-5000:]
    multi, local = slurm_run.out, tmp_path / "local"
    _assert_complete(multi / "demo/checkpoints/step-00000002", world=2)
    shutil.rmtree(multi / "demo/ranks")  # this run's ranks write theirs anew

    rc, out, t2 = _run(loopback_cluster, demo_data_dir, tmp_path, "multi2", multi, 4)
    assert rc == 0, out[-5000:]
    ranks = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in (multi / "demo/ranks").glob("*.json")}
    assert {r: v["node_address"] for r, v in ranks.items()} == {0: "127.0.0.1", 1: "127.0.0.2"}
    assert "resumed from" in out and "step-00000002 at step 2" in out, out[-5000:]
    _assert_complete(multi / "demo/checkpoints/step-00000004", world=2)
    got = _losses(multi / "demo")

    # the same 4 steps on one node (2 local ranks) for the losses to match, beside the 1-rank runs below, which leave
    # a core idle while they start
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        one_node = pool.submit(_run, loopback_cluster, demo_data_dir, tmp_path, "local", local, 4, local=True)

        # on 1 rank: launch/train.py converts the 2-rank ZeRO-2 checkpoint to DeepSpeed's universal format and loads it
        rc, out, t4 = _run(loopback_cluster, demo_data_dir, tmp_path, "one_rank", multi, 4, local=True, nproc=1)
        assert rc == 0, out[-5000:]
        step4, universal = multi / "demo/checkpoints/step-00000004", multi / "demo/universal/step-00000004"
        assert f"resumed from {step4} at step 4" in out and "through its universal conversion" in out, out[-5000:]
        assert (universal / "COMPLETE").read_text().strip() == str(step4.resolve())
        # what it converted loads into a 1-rank engine with every trainable weight equal to the checkpoint's
        job = [sys.executable, str(Path(__file__).with_name("universal_load_job.py")), str(universal), str(step4),
               str(tmp_path / "universal.json"), "--", *_train_args(demo_data_dir, tmp_path / "one", 6)]
        rc, out, t5 = run_launcher(job, loopback_cluster.workdir, loopback_cluster.env(), 300, tmp_path / "load.log")
        assert rc == 0, out[-5000:]
        loaded = json.loads((tmp_path / "universal.json").read_text())
        assert loaded["world_size"] == 1 and loaded["global_steps"] == 4
        assert loaded["trainable"] == loaded["in_checkpoint"] > 0 and loaded["mismatched"] == []
        # ...and the run goes on from it (the conversion reused), then drops it once it has a checkpoint of its own
        rc, out, t6 = _run(loopback_cluster, demo_data_dir, tmp_path, "one_rank_more", multi, 6, local=True, nproc=1)
        assert rc == 0 and "through its universal conversion" in out and "converting" not in out, out[-5000:]
        assert sorted(_losses(multi / "demo"))[-2:] == [5, 6]
        _assert_complete(multi / "demo/checkpoints/step-00000006", world=1)
        assert not universal.exists()

        rc, out, t3 = one_node.result()
    assert rc == 0, out[-5000:]
    want = _losses(local / "demo")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert [got[s] for s in range(1, 5)] == pytest.approx([want[s] for s in range(1, 5)], rel=1e-5, abs=1e-6)
    print(f"launch seconds: slurm (its test's) {slurm_run.seconds:.0f}, resumed over pdsh {t2:.0f}, on 1 rank through the universal format {t4:.0f}, its "
          f"weights checked {t5:.0f}, 2 more steps {t6:.0f}; local beside those {t3:.0f}")


@pytest.fixture(scope="module")
def dead_rank0(loopback_cluster, tmp_path_factory):
    """The tiny ZeRO-2 job (one rank per loopback "node") in which rank 0 dies at step 3, launched in the background
    when a test first asks for it: it mostly waits (on the heartbeat timeout), so it runs beside another launch.
    -> (its output dir, a future of run_launcher's (rc, output, seconds))."""
    run = tmp_path_factory.mktemp("dead_rank0") / "run"
    args = ["--out", str(run), "--steps", "200", "--die_rank", "0", "--die_at", "3", "--heartbeat_timeout", "5"]
    cmd = deepspeed_cmd(loopback_cluster, free_port(), TINY, args)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        yield run, pool.submit(run_launcher, cmd, loopback_cluster.workdir, loopback_cluster.env(), 120, run.parent / "fail.log")


@pytest.mark.usefixtures("dead_rank0")
def test_killed_rank_is_named_and_last_checkpoint_survives(loopback_cluster, demo_data_dir, tmp_path):
    """Rank 1 of the real trainer dies (rank 0 dying: the next test, whose launch runs beside this one)."""
    out_dir = tmp_path / "kill"
    run_dir = out_dir / "demo"
    args = _train_args(demo_data_dir, out_dir, 200, "engine.heartbeat_timeout_s=5")
    cmd = deepspeed_cmd(loopback_cluster, free_port(), TRAIN, args)
    env = dict(loopback_cluster.env(), PYTHONPATH=str(REPO))
    log = tmp_path / "kill.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=loopback_cluster.workdir, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            first = run_dir / "checkpoints/step-00000002/COMPLETE"
            while not (first.exists() and (run_dir / "ranks/rank1.json").exists()) and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-5000:]
                time.sleep(0.2)
            assert first.exists(), log.read_text()[-5000:]
            victim = json.loads((run_dir / "ranks/rank1.json").read_text())
            assert victim["node_address"] == "127.0.0.2"
            os.kill(victim["pid"], signal.SIGKILL)  # "node 2" dies mid-run
            killed_at = time.monotonic()
            rc = proc.wait(timeout=90)
            exit_s = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    out = log.read_text()
    assert rc != 0, out[-5000:]
    assert "rank 1 (host 127.0.0.2) stopped responding; exiting" in out, out[-5000:]
    # rank 0 summarises the run before the watchdog ends it (after an error summary, if a collective failed first)
    assert "[of_ds] stopped:     stall (rank 1 (host 127.0.0.2) stopped responding; exiting)" in out, out[-5000:]
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == "stall"
    assert exit_s < 5 + 30, exit_s  # heartbeat timeout + teardown, not the 30-minute collective timeout
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert done, "no complete checkpoint left"
    _assert_complete(done[-1], world=2)
    survivor = json.loads((run_dir / "ranks/rank0.json").read_text())["pid"]
    assert not Path(f"/proc/{survivor}").exists() or "zombie" in Path(f"/proc/{survivor}/status").read_text()
    print(f"survivor exit {exit_s:.1f}s after the kill; last complete checkpoint {done[-1].name}")


def test_dead_rank0_is_named_and_survivor_exits(dead_rank0):
    """Rank 0 also serves the rendezvous store: rank 1 notices through the lost store (rank 1 dying: the test above)."""
    run, launch = dead_rank0
    rc, out, secs = launch.result()
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in (run / "ranks").glob("rank*.json")}
    assert {r: v["node_address"] for r, v in ranks.items()} == {0: "127.0.0.1", 1: "127.0.0.2"}
    assert rc not in (0, -9), out[-4000:]  # failed, and by itself: not killed by our time limit
    assert "rank 0 (host 127.0.0.1) stopped responding; exiting" in out, out[-4000:]
    assert secs < 100, secs  # 200 steps x 0.5 s would take longer; the survivor left early
    print(f"rank 0 killed: launcher exited rc={rc} after {secs:.1f}s")
