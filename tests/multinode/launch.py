"""Run the `deepspeed` launcher (pdsh onto the loopback cluster, or plain local ranks) with a bounded wait."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .conftest import REPO, LoopbackCluster, free_port


def deepspeed_cmd(cluster: LoopbackCluster | None, master_port: int, script: Path, args: list[str]) -> list[str]:
    """`deepspeed --hostfile H --launcher pdsh ...` for the cluster, or `deepspeed --num_gpus 2 ...` without one."""
    launcher = [str(Path(sys.executable).parent / "deepspeed")]
    if cluster is None:
        where = ["--num_gpus", "2"]
    else:
        where = ["--hostfile", str(cluster.hostfile()), "--launcher", "pdsh", "--ssh_port", str(cluster.port)]
    return launcher + where + ["--master_addr", "127.0.0.1", "--master_port", str(master_port), str(script)] + args


def run_launcher(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float, log: Path) -> tuple[int, str, float]:
    """Run `cmd` in its own process group; kill the group if it outlives `timeout_s`. Returns (rc, output, seconds)."""
    env = dict(env, PYTHONPATH=f"{REPO}:{env.get('PYTHONPATH', '')}".rstrip(":"))
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            rc = -9
    return rc, log.read_text(), time.monotonic() - start


DEMO_SPEC = REPO / "launch" / "specs" / "demo.yaml"


def demo_overrides(data_dir: Path) -> list[str]:
    """`key=value` overrides that move every `demo_data/...` path of the demo spec under `data_dir`, so runs from any
    working directory share one generated demo dataset."""
    import yaml

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{where}.{k}" if where else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                name = v.get("name") if isinstance(v, dict) else None
                yield from walk(v, f"{where}.{name if name else i}")
        elif isinstance(node, str) and (node == "demo_data" or node.startswith("demo_data/")):
            # YAML-quoted: under pdsh the remote shell would brace-expand {000000..000003} (the override parser
            # strips the quotes again)
            yield f"{where}='{data_dir}{node[len('demo_data'):]}'"

    return list(walk(yaml.safe_load(DEMO_SPEC.read_text()), ""))


def train_sets(data_dir: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    """The multi-node runs' overrides of the demo spec: a checkpoint every 2 steps, a loss line every step, no
    evaluation."""
    return [*demo_overrides(data_dir), f"run.output_dir={out}", f"run.max_steps={max_steps}", "checkpoint.every_n_steps=2",
            "logging.every_n_steps=1", "logging.progress_bar=false", "logging.eval_every_n_steps=0", *extra]


SLURM_NODES = ("127.0.0.1", "127.0.0.2")
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


@dataclass(frozen=True)
class SlurmRun:
    """What launch/slurm_train.sh's run left, read as soon as it ended (a later run resumes it)."""

    rc: int
    output: str
    seconds: float
    out: Path  # run.output_dir: the run dir is out/demo
    hostfile: str
    node_addresses: dict[int, str]
    step2_complete: bool


def run_slurm(data_dir: Path, out: Path, max_steps: int = 2) -> SlurmRun:
    """launch/slurm_train.sh on one machine: stand-in `srun`/`scontrol` start one task per "node", and each task
    runs the script's real `deepspeed --no_ssh --node_rank` path into the real trainer (the demo spec, ZeRO-2)."""
    shims = out / "bin"
    shims.mkdir(parents=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text.format(nodes=" ".join(SLURM_NODES)))
        (shims / name).chmod((shims / name).stat().st_mode | stat.S_IEXEC)
    env = dict(
        os.environ, PATH=f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}", DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="42",
        SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
        HOSTFILE=str(out / "hostfile"),
    )
    args = [str(REPO / "launch/slurm_train.sh"), "--spec", str(DEMO_SPEC)]
    for s in train_sets(data_dir, out, max_steps):
        args += ["--set", s]
    rc, output, secs = run_launcher(["bash", *args], out, env, 420, out / "slurm.log")
    ranks = [json.loads(p.read_text()) for p in (out / "demo/ranks").glob("*.json")]
    return SlurmRun(rc, output, secs, out, (out / "hostfile").read_text() if (out / "hostfile").exists() else "",
                    {r["rank"]: r["node_address"] for r in ranks}, (out / "demo/checkpoints/step-00000002/COMPLETE").is_file())
