"""A tiny ZeRO-2 job for the launcher tests: trains a small MLP, writes rank files and per-rank losses.

Usage (under the `deepspeed` launcher): tiny_ds_job.py --out DIR [--steps N] [--die_rank R --die_at S]
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import deepspeed
import torch

from of_ds.watchdog import collective_timeout, start_watchdog


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--die_rank", type=int, default=-1)
    ap.add_argument("--die_at", type=int, default=-1)
    ap.add_argument("--heartbeat_timeout", type=float, default=8.0)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()

    deepspeed.init_distributed(dist_backend="gloo", timeout=collective_timeout(600))
    rank = torch.distributed.get_rank()
    out = Path(args.out)
    dog = start_watchdog(out, args.heartbeat_timeout, interval_s=0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(100 + rank)
    losses = []
    for step in range(args.steps):
        if rank == args.die_rank and step == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(4, 16, generator=gen)
        loss = ((engine(x) - x.sum(1, keepdim=True)) ** 2).mean()
        engine.backward(loss)
        engine.step()
        avg = loss.detach().clone()
        torch.distributed.all_reduce(avg)
        losses.append(avg.item() / torch.distributed.get_world_size())
        if args.die_at >= 0:
            time.sleep(0.5)  # give the failure test time to act mid-run
    (out / f"losses_rank{rank}.json").write_text(json.dumps(losses))
    torch.distributed.barrier()
    if dog is not None:
        dog.stop()


if __name__ == "__main__":
    main()
