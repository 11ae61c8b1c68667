"""Runtime facts of this process (rank, world size, device, backend), computed once from the launcher's env.

torchrun and the deepspeed launcher both export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. A plain
`python launch/train.py` has none of them: it is rank 0 of 1 and gets a loopback rendezvous on a free port, so it
never needs MASTER_ADDR (the original's bug B18).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .spec import EngineSpec


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    # set by the multi-node watchdog (of_ds/watchdog.py); the loop calls heartbeat() once per step
    heartbeat_fn: Optional[Callable[[int], None]] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        """The end of a run: wait for every rank, then tear the process group down (NCCL warns at exit when a
        process leaves it up, and a rank leaving early would take rank 0's rendezvous store from the others)."""
        if not self.distributed:
            return
        dist.barrier()
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and ds_comm.cdb is not None:
            ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups (stale for a later group)
        else:
            dist.destroy_process_group()

    def heartbeat(self, step: int) -> None:
        """Per-step liveness hook for the multi-node watchdog; a no-op until one is installed."""
        if self.heartbeat_fn is not None:
            self.heartbeat_fn(step)

    def any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """Bool flags (any shape), each true where it is true on any rank. Stays on the flag's device: with NCCL
        the host does not wait for it (gloo reduces a CPU copy)."""
        if not self.distributed:
            return flag
        t = flag.to(self.comm_device, torch.float32).reshape(-1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.reshape(flag.shape).to(flag.device) > 0

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        if not self.distributed or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_rendezvous_env() -> None:
    """Give a launcher-less single process the env a process group needs (loopback, a free port)."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def pick_device(local_rank: int, set_device_rank: bool) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        index = local_rank if set_device_rank else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def share_cpu_cores() -> Optional[int]:
    """Give each rank of this machine its share of the CPU cores for torch's intra-op threads; -> the count set, or
    None where OMP_NUM_THREADS decides (the user's, or torchrun's) or one rank has them all. By default torch takes
    every core in each process, so N ranks on one machine run N times as many threads as there are cores, which wait
    on each other: the demo's 2 ranks on 2 cores took 20% longer per step so."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun's, deepspeed's
    if local <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return threads


def build_runtime(engine: EngineSpec, *, init_process_group: bool = True, timeout_s: Optional[float] = None) -> Runtime:
    """Read rank/world size from the env, pick the device, and (optionally) start the process group once."""
    ensure_rendezvous_env()
    share_cpu_cores()
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(local_rank, engine.set_device_rank)
    backend = engine.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    if timeout_s is None:
        timeout_s = getattr(engine, "collective_timeout_s", None)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    if init_process_group and not dist.is_initialized():
        if engine.kind == "deepspeed":
            import deepspeed

            kwargs = {"timeout": timeout} if timeout else {}
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, init_method=engine.dist_url, **kwargs)
        else:
            kwargs = {"timeout": timeout} if timeout else {}
            dist.init_process_group(backend=backend, init_method=engine.dist_url, rank=rank, world_size=world, **kwargs)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def seed_everything(seed: int) -> None:
    """The same model init on every rank (ZeRO-3 and DDP expect identical starting weights)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment; fp32 runs use the same table (documented)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0, "4090": 165.0}


def device_peak_tflops(device: torch.device) -> Optional[float]:
    """Peak dense throughput of `device` for MFU (training metrics, tools/bench_step); None off CUDA or unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None
