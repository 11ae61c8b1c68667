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
