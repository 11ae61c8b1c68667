"""The pdsh launcher path with a tiny ZeRO-2 job: two loopback "nodes", one rank each."""

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


def test_pdsh_two_nodes_match_local_run(loopback_cluster, tmp_path):
    env = loopback_cluster.env()
    multi, local = tmp_path / "multi", tmp_path / "local"
    rc, out, secs = run_launcher(
        deepspeed_cmd(loopback_cluster, _port(), TINY, ["--out", str(multi)]),
        loopback_cluster.workdir, env, 240, tmp_path / "multi.log",
    )
    assert rc == 0, out[-4000:]
    ranks = _ranks(multi)
    assert sorted(ranks) == [0, 1]
    assert {r["node_address"] for r in ranks.values()} == {"127.0.0.1", "127.0.0.2"}
    assert ranks[0]["node_address"] == "127.0.0.1"  # the hostfile's first host gets rank 0

    rc, out, _ = run_launcher(
        deepspeed_cmd(None, _port(), TINY, ["--out", str(local)]), tmp_path, env, 240, tmp_path / "local.log"
    )
    assert rc == 0, out[-4000:]
    for r in (0, 1):
        got = json.loads((multi / f"losses_rank{r}.json").read_text())
        want = json.loads((local / f"losses_rank{r}.json").read_text())
        assert got == pytest.approx(want, rel=1e-6)


def test_dead_rank0_is_named_and_survivor_exits(loopback_cluster, tmp_path):
    """Rank 0 also serves the rendezvous store; its death is found from the lost store (rank 1 dying: test_train)."""
    die_rank = 0
    run = tmp_path / "run"
    args = ["--out", str(run), "--steps", "200", "--die_rank", str(die_rank), "--die_at", "3", "--heartbeat_timeout", "5"]
    rc, out, secs = run_launcher(
        deepspeed_cmd(loopback_cluster, _port(), TINY, args), loopback_cluster.workdir, loopback_cluster.env(),
        120, tmp_path / "fail.log",
    )
    host = "127.0.0.1"
    assert rc not in (0, -9), out[-4000:]
    assert f"rank {die_rank} (host {host}) stopped responding; exiting" in out, out[-4000:]
    print(f"rank 0 killed: launcher exited rc={rc} after {secs:.1f}s")
