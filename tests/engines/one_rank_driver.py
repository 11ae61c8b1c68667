"""Run as `python one_rank_driver.py STAGE[:keep] ...` (1 rank, DS_ACCELERATOR=cpu): for each mode, in one process,
three optimizer steps of a tiny model under DeepSpeed ZeRO-STAGE bf16, two micro-steps each, on fixed batches. Prints
one JSON line per mode: the mode, the losses, a digest of the trainable weights after the last step, the bytes per
trainable parameter that the last backward moved (counted by of_ds.perf.traffic's counter) and the `reduce_scatter`
DeepSpeed ran with. `:keep` leaves DeepSpeed's default (`sync_free_ds_config` turns it off on one rank)."""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import of_ds.engines.deepspeed_engine as deepspeed_engine  # noqa: E402
from of_ds.perf.bench_step import bench_spec, random_batches  # noqa: E402
from of_ds.perf.traffic import TrafficCounter  # noqa: E402
from of_ds.model import count_parameters  # noqa: E402
from of_ds.runtime import build_runtime  # noqa: E402
from of_ds.train.plan import resolve_plan  # noqa: E402
from of_ds.train.trainer import build_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SYNC_FREE = deepspeed_engine.sync_free_ds_config


def keep_reduce_scatter(ds_config, world_size, device_skip):
    out = SYNC_FREE(ds_config, world_size, device_skip)
    out["zero_optimization"] = {**out["zero_optimization"], "reduce_scatter": True}
    return out


def run(stage: int, keep: bool, runtime) -> dict:
    sets = ["engine.precision=bf16", f"engine.zero_stage={stage}", "optim.grad_accum_steps=2", "optim.warmup_steps=0", "optim.lr=1e-3",
            "run.seed=3", "model.cross_attn.heads=4", "model.cross_attn.dim_head=64",
            "model.lm.config={model_type: mpt, d_model: 256, n_layers: 2, n_heads: 4, vocab_size: 1000, max_seq_len: 256, expansion_ratio: 4}"]
    deepspeed_engine.sync_free_ds_config = keep_reduce_scatter if keep else SYNC_FREE
    spec = bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), sets, True, Path(tempfile.mkdtemp()))
    plan = resolve_plan(spec, runtime.world_size, data=False, run_dir=False).with_steps(10)
    spec, engine = plan.spec, build_trainer(plan, runtime, data=False).engine
    generator = torch.Generator().manual_seed(0)
    micro = [random_batches(spec, engine.module, 64, generator) for _ in range(2)]
    weights = {d.name: d.loss_weight for d in spec.data.datasets}
    losses, counter = [], TrafficCounter()
    for step in range(3):
        for i, batches in enumerate(micro):
            loss = engine.forward(batches, weights)["loss"]
            losses.append(float(loss))
            if step == 2 and i == 1:
                with counter:
                    engine.backward(loss)
            else:
                engine.backward(loss)
        engine.step()
    digest = hashlib.sha256()
    for name, p in sorted(engine.module.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().numpy().tobytes())
    trainable = count_parameters(engine.module)["trainable"]
    return {"losses": losses, "weights_sha256": digest.hexdigest(), "trainable": trainable,
            "backward_bytes_per_trainable": counter.traffic.kinds["memory"].bytes / trainable,
            "reduce_scatter": engine.engine.zero_reduce_scatter()}


runtime = build_runtime(bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), [], True, Path(tempfile.mkdtemp())).engine)
for mode in sys.argv[1:]:
    stage, _, keep = mode.partition(":")
    print(json.dumps({"mode": mode, **run(int(stage), keep == "keep", runtime)}), flush=True)
