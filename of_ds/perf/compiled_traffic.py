"""`tools/compiled_traffic --spec launch/specs/openflamingo-3b.yaml`: how much of a step's memory-bound traffic
`torch.compile` removes, measured on this machine, projected to the recipe's full size.

`tools/bench_step --traffic` counts the eager step on the meta device. A compiled step cannot be counted that way
(inductor generates kernels, not aten operators), so this runs real steps at the recipe's widths with fewer layers
and rows (CPU-sized: one MMC4 row and eight LAION rows, packed) twice: eager under the traffic counter, and as one
`torch.compile`d model with inductor's own count of the bytes each generated kernel reads and writes (its
`count_bytes`, the number behind its bandwidth metrics; matmul and attention kernels left out; a forward that
breaks into several graphs is refused, as the code between them would go uncounted). With 1 or 2 LM
layers and 1 or 2 vision layers, the differences give each kind of layer's ratio, compiled over eager, and the rest
(perceiver, loss, embeddings) its own; the meta count at full size, split the same way, is then scaled by them.
nn.MultiheadAttention's fused fast path is off in both small runs and in the meta counts that are scaled (compiled,
the vision tower is traced through the unfused path); the eager figure it is compared with is the step as a GPU runs
it eager, the frozen tower on that fast path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .bench_step import bench_spec, random_batches
from .traffic import H200_MEASURED, TrafficCounter, count_step_traffic, weight_dtype

MM_KINDS = ("mm", "attention", "convolution")


@contextlib.contextmanager
def inductor_memory_bytes() -> Iterator[list]:
    """Yields a one-element list that collects the bytes of the kernels inductor generates while inside (its own
    per-kernel count; extern matmul, attention and convolution kernels not counted)."""
    import logging

    import torch._functorch.config
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    total = [0]
    original, level = GraphLowering.count_bytes, compile_fx.inductor_metrics_log.level

    def count_bytes(self):
        out = original(self)
        for node, _ in out[1]:
            kernel = getattr(getattr(node, "node", None), "python_kernel_name", None) or ""
            if not (isinstance(node, ExternKernelSchedulerNode) and any(k in kernel for k in MM_KINDS)):
                total[0] += node.get_read_write_buffers_sizes()
        return out

    GraphLowering.count_bytes = count_bytes
    compile_fx.inductor_metrics_log.setLevel(logging.INFO)  # inductor counts only when this log is on
    try:
        # a graph loaded from inductor's caches is never scheduled, so never counted
        with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            yield total
    finally:
        GraphLowering.count_bytes = original
        compile_fx.inductor_metrics_log.setLevel(level)


def eager_and_compiled_bytes(spec) -> tuple[int, int]:
    """Memory-bound bytes of one training step of `spec`'s model (built for real on the CPU): eager, counted per
    aten operator, and compiled (the whole model under torch.compile), counted by inductor."""
    from ..model import build_flamingo
    from ..model.vision import tower_image_size
    from ..engines.base import fused_row_lengths, weighted_losses

    torch.manual_seed(0)
    model, _, _ = build_flamingo(spec.model)
    dtype = weight_dtype(spec.engine.precision)
    model.to(dtype).train()
    batches = random_batches(spec, model, tower_image_size(model), torch.Generator().manual_seed(0))
    weights = {d.name: d.loss_weight for d in spec.data.datasets}
    fuse = fused_row_lengths(model, spec)

    class Compiled:  # what weighted_losses calls: the compiled model, with the plain one as `.module`
        module = model
        forward = torch.compile(model)

        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

    def step(m) -> None:
        weighted_losses(m, batches, weights, torch.device("cpu"), dtype, fuse=fuse)["loss"].backward()

    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = TrafficCounter()
        with counter:
            step(model)
        model.zero_grad(set_to_none=True)
        torch._dynamo.utils.counters.clear()
        with inductor_memory_bytes() as compiled:
            step(Compiled())
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    if breaks:  # what runs between graphs is eager and uncounted: the comparison would be biased
        raise RuntimeError(f"compiled_traffic: the model's forward broke into several graphs ({breaks}); counts not comparable")
    return counter.traffic.kinds["memory"].bytes, compiled[0]


def layer_sets(spec, lm_layers: int, vision_layers: int) -> list[str]:
    """Overrides giving `spec`'s model `lm_layers` LM layers and `vision_layers` vision layers (widths kept)."""
    import open_clip

    lm = dict(spec.model.lm.config, **{_layers_key(spec.model.lm.config): lm_layers})
    vision = dict(spec.model.vision.config or open_clip.get_model_config(spec.model.vision.name))
    vision["vision_cfg"] = dict(vision["vision_cfg"], layers=vision_layers)
    return [f"model.lm.config={json.dumps(lm)}", f"model.vision.name={spec.model.vision.name}-layers", f"model.vision.config={json.dumps(vision)}"]


def _layers_key(config: dict) -> str:
    return next(k for k in ("n_layers", "num_hidden_layers", "n_layer", "num_layers") if k in config)


def main(argv: list[str] | None = None) -> int:
    import open_clip

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rows", default="1,8", help="rows of the first and second dataset in the measured steps")
    p.add_argument("--tiny", action="store_true", help="bench_step's tiny model (a smoke run)")
    args = p.parse_args(argv)
    rows = [f"data.datasets.{i}.batch_size={r}" for i, r in enumerate(args.rows.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        full = bench_spec(args.spec, args.overrides, args.tiny, Path(tmp) / "full")
        if full.model.cross_attn.every_n_layers != 1:
            raise SystemExit("compiled_traffic: needs cross-attention in every LM layer (model.cross_attn.every_n_layers 1), "
                             "so that each LM layer counted is a FlamingoLayer with its block")
        n_lm = full.model.lm.config[_layers_key(full.model.lm.config)]
        n_vis = (full.model.vision.config or open_clip.get_model_config(full.model.vision.name))["vision_cfg"]["layers"]
        small = {}
        for lm, vis in ((1, 1), (2, 1), (1, 2)):
            spec = bench_spec(args.spec, args.overrides + layer_sets(full, lm, vis) + rows + ["model.perceiver.depth=1"], args.tiny, Path(tmp) / f"{lm}{vis}")
            small[lm, vis] = eager_and_compiled_bytes(spec)
        meta = {}
        for lm, vis in ((n_lm, n_vis), (n_lm - 1, n_vis), (n_lm, n_vis - 1)):
            spec = bench_spec(args.spec, args.overrides + layer_sets(full, lm, vis), args.tiny, Path(tmp) / f"m{lm}{vis}")
            meta[lm, vis] = count_step_traffic(spec, mha_fast_path=False)
        eager = count_step_traffic(full)  # as a GPU runs the eager step
        fewer = count_step_traffic(bench_spec(args.spec, args.overrides + layer_sets(full, n_lm, n_vis - 1), args.tiny, Path(tmp) / "fast"))
        vision_layer_fast = eager.kinds["memory"].bytes - fewer.kinds["memory"].bytes
    (e11, c11), (e21, c21), (e12, c12) = small[1, 1], small[2, 1], small[1, 2]
    ratio = {"lm_layer": (c21 - c11) / (e21 - e11), "vision_layer": (c12 - c11) / (e12 - e11)}
    ratio["rest"] = (c11 - (c21 - c11) - (c12 - c11)) / (e11 - (e21 - e11) - (e12 - e11))
    whole = meta[n_lm, n_vis]  # unfused attention, as compiled
    eager_full = {"lm_layer": whole.kinds["memory"].bytes - meta[n_lm - 1, n_vis].kinds["memory"].bytes,
                  "vision_layer": whole.kinds["memory"].bytes - meta[n_lm, n_vis - 1].kinds["memory"].bytes}
    eager_full["rest"] = whole.kinds["memory"].bytes - n_lm * eager_full["lm_layer"] - n_vis * eager_full["vision_layer"]
    count = {"lm_layer": n_lm, "vision_layer": n_vis, "rest": 1}
    compiled_full = sum(count[k] * eager_full[k] * ratio[k] for k in ratio)
    # the vision tower left eager (engine.compile_targets without vision): its fast path instead of its compiled graph
    vision_eager = compiled_full - n_vis * eager_full["vision_layer"] * ratio["vision_layer"] + n_vis * vision_layer_fast
    eager_ms = eager.projected_seconds()["memory"] * 1e3
    to_ms = lambda nbytes: (nbytes + whole.optimizer_bytes) / (H200_MEASURED.memory_tbps * 1e12) * 1e3  # noqa: E731
    compiled_ms, vision_eager_ms = to_ms(compiled_full), to_ms(vision_eager)
    step_ms = lambda memory_ms: round((eager.projected_seconds()["total"] - eager_ms / 1e3 + memory_ms / 1e3) * 1e3, 1)  # noqa: E731
    print(json.dumps({
        "compiled_over_unfused_eager": {k: round(v, 3) for k, v in ratio.items()},
        "unfused_eager_gb": {k: round(count[k] * v / 1e9, 2) for k, v in eager_full.items()},
        "eager_vision_layer_gb": round(vision_layer_fast / 1e9, 3),
        "memory_gb": {"eager": round(eager.kinds["memory"].bytes / 1e9, 2), "unfused_eager": round(whole.kinds["memory"].bytes / 1e9, 2),
                      "compiled": round(compiled_full / 1e9, 2), "compiled_vision_eager": round(vision_eager / 1e9, 2)},
        "memory_ms_at_calibrated_rate": {"eager": round(eager_ms, 1), "compiled": round(compiled_ms, 1), "compiled_vision_eager": round(vision_eager_ms, 1)},
        "projected_step_ms": {"eager": step_ms(eager_ms), "compiled": step_ms(compiled_ms), "compiled_vision_eager": step_ms(vision_eager_ms)},
        "measured_small_gb": {f"{lm}x{vis}": [round(e / 1e9, 4), round(c / 1e9, 4)] for (lm, vis), (e, c) in small.items()},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
