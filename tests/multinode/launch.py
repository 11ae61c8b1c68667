"""Run the `deepspeed` launcher (pdsh onto the loopback cluster, or plain local ranks) with a bounded wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import REPO, LoopbackCluster


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
