"""launch/slurm_train.sh on one machine: stand-in `srun`/`scontrol` start one task per "node", and each task runs
the real `deepspeed --no_ssh --node_rank` path of the script into the real trainer."""

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .launch import DEMO_SPEC, demo_overrides, run_launcher

pytestmark = pytest.mark.slow
NODES = ("127.0.0.1", "127.0.0.2")

# srun: one copy of the command per node, concurrently, with that node's SLURM_NODEID / SLURMD_NODENAME
SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=(); i=0
for node in {nodes}; do SLURM_NODEID=$i SLURMD_NODENAME=$node "$@" & pids+=($!); i=$((i+1)); done
rc=0; for p in "${{pids[@]}}"; do wait "$p" || rc=$?; done; exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf '%s\\n' {nodes}
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text.format(nodes=" ".join(NODES)))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_runs_one_launcher_per_node(demo_data_dir, tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    _script(shims / "srun", SRUN)
    _script(shims / "scontrol", SCONTROL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, PATH=f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}", DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="42",
        SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1", MASTER_PORT=str(port),
        HOSTFILE=str(tmp_path / "hostfile"),
    )
    sets = [*demo_overrides(demo_data_dir), f"run.output_dir={tmp_path}", "run.max_steps=2", "logging.progress_bar=false",
            "logging.eval_every_n_steps=0"]
    args = [str(REPO / "launch/slurm_train.sh"), "--spec", str(DEMO_SPEC)]
    for s in sets:
        args += ["--set", s]
    rc, out, secs = run_launcher(["bash", *args], tmp_path, env, 420, tmp_path / "slurm.log")
    assert rc == 0, out[-5000:]
    assert (tmp_path / "hostfile").read_text() == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    ranks = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in (tmp_path / "demo/ranks").glob("*.json")}
    assert {r: v["node_address"] for r, v in ranks.items()} == {0: "127.0.0.1", 1: "127.0.0.2"}
    assert (tmp_path / "demo/checkpoints/step-00000002/COMPLETE").is_file()
    print(f"slurm script run: {secs:.0f}s")
