"""The pdsh launcher path with a tiny ZeRO-2 job (two loopback "nodes", one rank each): rank 0 dies.

The real trainer's multi-node runs are in test_train.py; this job is small enough to kill rank 0 cheaply."""

import json
import socket
from pathlib import Path

import pytest

from .launch import deepspeed_cmd, run_launcher

TINY = Path(__file__).with_name("tiny_ds_job.py")
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(run: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (run / "ranks").glob("rank*.json")}


def test_dead_rank0_is_named_and_survivor_exits(loopback_cluster, tmp_path):
    """Rank 0 also serves the rendezvous store: rank 1 notices through the lost store (rank 1 dying: test_train)."""
    run = tmp_path / "run"
    args = ["--out", str(run), "--steps", "200", "--die_rank", "0", "--die_at", "3", "--heartbeat_timeout", "5"]
    rc, out, secs = run_launcher(
        deepspeed_cmd(loopback_cluster, _port(), TINY, args), loopback_cluster.workdir, loopback_cluster.env(),
        120, tmp_path / "fail.log",
    )
    assert {r: v["node_address"] for r, v in _ranks(run).items()} == {0: "127.0.0.1", 1: "127.0.0.2"}
    assert rc not in (0, -9), out[-4000:]  # failed, and by itself: not killed by our time limit
    assert "rank 0 (host 127.0.0.1) stopped responding; exiting" in out, out[-4000:]
    assert secs < 100, secs  # 200 steps x 0.5 s would take longer; the survivor left early
    print(f"rank 0 killed: launcher exited rc={rc} after {secs:.1f}s")
