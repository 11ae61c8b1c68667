"""Run as `python traffic_optimizer_driver.py` (1 rank, DS_ACCELERATOR=cpu): count, with of_ds.perf.traffic's
counter, the bytes of a DeepSpeed ZeRO-2 bf16 optimizer step and print them per trainable parameter (one JSON line),
the figure `OPTIMIZER_BYTES_PER_TRAINABLE` stands for."""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from of_ds.perf.bench_step import bench_spec, random_batches  # noqa: E402
from of_ds.perf.traffic import TrafficCounter  # noqa: E402
from of_ds.model import count_parameters  # noqa: E402
from of_ds.runtime import build_runtime  # noqa: E402
from of_ds.train.plan import resolve_plan  # noqa: E402
from of_ds.train.trainer import build_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SETS = ["engine.precision=bf16", "engine.zero_stage=2", "model.cross_attn.heads=4", "model.cross_attn.dim_head=64",
        "model.lm.config={model_type: mpt, d_model: 256, n_layers: 2, n_heads: 4, vocab_size: 1000, max_seq_len: 256, expansion_ratio: 4}"]

spec = bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), SETS, True, Path(tempfile.mkdtemp()))
runtime = build_runtime(spec.engine)
plan = resolve_plan(spec, runtime.world_size, data=False, run_dir=False).with_steps(10)
spec, engine = plan.spec, build_trainer(plan, runtime, data=False).engine
model = engine.module
batches = random_batches(spec, engine.module, 64, torch.Generator().manual_seed(0))
weights = {d.name: d.loss_weight for d in spec.data.datasets}
counter = TrafficCounter()
for step in range(3):  # the last step counted, after the optimizer's state exists
    engine.backward(engine.forward(batches, weights)["loss"])
    if step == 2:
        with counter:
            engine.step()
    else:
        engine.step()
trainable = count_parameters(model)["trainable"]
print(json.dumps({"trainable": trainable, "bytes_per_trainable": counter.traffic.kinds["memory"].bytes / trainable,
                  "ops": sorted(counter.traffic.ops)}), flush=True)
