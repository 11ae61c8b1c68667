"""`tools/bench_step --spec launch/specs/openflamingo-3b.yaml`: time training steps of a spec's model on random
batches of its shapes, and print one JSON line (step time, samples/s, TFLOP/s, MFU, peak memory).

Nothing is downloaded: the LM is built randomly initialised from its own config.json where that is on this machine
(a local directory, as the demo's, or the HF cache), else from its release's published config
(`of_ds.model.releases.LM_CONFIGS`: the 3B recipe's MosaicGPT with QK LayerNorm, the 4B's GPT-NeoX, the 9B's MPT;
unknown names get the 3B recipe's); the vision tower is built unpretrained (with the activation its pretrained tag
was trained with), and the tokenizer is a local word-level vocabulary of the LM's vocabulary size, at most the
releases' (50277).
`--tiny` shrinks model and batches so it runs on a CPU; `--skeleton` keeps the recipe's layer counts and batch shapes at tiny widths (with `--count-ops`: what a step
dispatches, measurable on a CPU). `--traffic` times nothing: it counts one step's bytes and FLOPs on the meta device
at the recipe's sizes and projects the kernel time (`of_ds.perf.traffic`).
FLOPs come from `of_ds.model.flops.count_step_flops` (forward + backward, every image slot counted).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..model.releases import GPT_NEOX_TOKENS, LM_CONFIGS, MPT_1B, fp32_lm_config
from ..model.vision import uses_quick_gelu
from ..spec import RunSpec

# the skeleton's LM widths, by family: (width, heads, vocabulary) keys
SKELETON_LM = {
    "mpt": {"d_model": 32, "n_heads": 2, "vocab_size": 512},
    "mosaic_gpt": {"d_model": 32, "n_heads": 2, "vocab_size": 512},
    "gpt_neox": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 512},
}
TINY_SETS = [
    "model.lm.config={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: false}",
    "model.vision.name=bench-vit-tiny", "model.vision.pretrained=null",
    "model.vision.config={embed_dim: 32, vision_cfg: {image_size: 64, layers: 2, width: 64, head_width: 32, patch_size: 16, mlp_ratio: 2.0}, text_cfg: {context_length: 8, vocab_size: 32, width: 16, heads: 2, layers: 1}}",
    "model.perceiver={depth: 1, heads: 2, dim_head: 16, num_latents: 8}", "model.cross_attn.heads=2", "model.cross_attn.dim_head=16",
    "engine.precision=fp32",
]


def synthetic_tokenizer(n_tokens: int, out: Path) -> Path:
    """A word-level tokenizer with `n_tokens` entries (eos `</s>` included), saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return out


def bench_spec(spec_path: str, overrides: list[str], tiny: bool, tmp: Path, skeleton: bool = False) -> RunSpec:
    spec = RunSpec.from_yaml(spec_path, (TINY_SETS if tiny else []) + overrides)
    data = spec.to_dict()
    m = data["model"]
    m["offline"] = True
    m["vision"]["quick_gelu"] = uses_quick_gelu(spec.model.vision)
    m["vision"]["pretrained"] = None
    if m["lm"]["config"] is None:
        config = bench_lm_config(m["lm"]["name_or_path"], m["lm"]["cache_dir"])
        m["lm"].update(config=config, name_or_path=None, trust_remote_code=False)
    if skeleton:
        shrink_to_skeleton(m)
    lm_vocab = m["lm"]["config"].get("vocab_size", 1000 if tiny else MPT_1B["vocab_size"])
    n_tokens = min(GPT_NEOX_TOKENS, lm_vocab) if not tiny else lm_vocab - 8
    m["tokenizer"] = str(synthetic_tokenizer(n_tokens, tmp / "tokenizer"))
    if tiny:
        for d in data["data"]["datasets"]:
            d.update(batch_size=min(d["batch_size"], 4 if d["kind"] == "laion" else 2), workers=0,
                     max_images=min(d.get("max_images", 6), 2), max_tokens=32 if d["kind"] == "laion" else 64)
    data["run"]["output_dir"] = str(tmp / "runs")
    return RunSpec.from_dict(data)


def bench_lm_config(name: str, cache_dir: str | None = None) -> dict:
    """The config the bench builds `model.lm` from, at random init: the LM's own config.json where it is on this
    machine (a local directory, as the demo's, or the HF cache), else its release's published config (unknown
    names: the 3B recipe's). Built in fp32 as a loaded LM is (the dtype left out); the engine casts the model to
    `engine.precision`."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(name, cache_dir=cache_dir, local_files_only=True)
    except OSError:
        config = LM_CONFIGS.get(name, MPT_1B)
        if name not in LM_CONFIGS:
            print(f"[of_ds] model.lm.name_or_path '{name}': no config.json on this machine and not a release's LM; "
                  f"benching the 3B recipe's LM (MPT-1B) in its place", flush=True)
    return fp32_lm_config(config)


def shrink_to_skeleton(m: dict) -> None:
    """The model's structure at tiny widths (in place on a spec's `model` dict): every layer count, the number of
    latents, the image grid's token count per image and the batch shapes are kept; widths, heads and the
    vocabulary shrink until the operators cost next to nothing. What is left of a step's time on a CPU is the host's
    cost of dispatching them: a proxy, where no GPU is at hand, for a step's kernel-launch work (`--count-ops`)."""
    import open_clip

    lm = m["lm"]["config"]
    if lm.get("model_type") not in SKELETON_LM:
        raise SystemExit(f"--skeleton: only the recipes' LM families ({', '.join(SKELETON_LM)}) are shrunk")
    m["lm"]["config"] = {**lm, **SKELETON_LM[lm["model_type"]]}
    vision = (m["vision"]["config"] or open_clip.get_model_config(m["vision"]["name"]))["vision_cfg"]
    grid = vision.get("image_size", 224) // vision["patch_size"]
    m["vision"].update(name="skeleton-vit", config={
        "embed_dim": 32, "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1},
        "vision_cfg": {"image_size": 2 * grid, "patch_size": 2, "layers": vision["layers"], "width": 32, "head_width": 16, "mlp_ratio": 4.0},
    })
    m["perceiver"].update(heads=2, dim_head=16)
    m["cross_attn"].update(heads=2, dim_head=16)


def random_batches(spec: RunSpec, model, image_size: int, generator: torch.Generator) -> dict:
    """One micro-batch per dataset with every image slot real and `<image>`/`<|endofchunk|>` in place."""
    out = {}
    base = model.new_tokens.base_vocab_size
    for d in spec.data.datasets:
        b, L = d.batch_size, d.effective_max_tokens()
        t = 1 if d.kind == "laion" else d.max_images
        ids = torch.randint(2, min(base, model.media_token_id, model.eoc_token_id), (b, L), generator=generator)
        starts = torch.linspace(0, L - 2, t + 1).long()[:-1]
        ids[:, starts] = model.media_token_id
        ids[:, starts + max(1, (L // t) - 1)] = model.eoc_token_id
        labels = ids.masked_fill(ids == model.media_token_id, -100)
        out[d.name] = {
            "pixel_values": torch.randn(b, t, 3, image_size, image_size, generator=generator),
            "num_images": torch.full((b,), t, dtype=torch.long),
            "input_ids": ids, "attention_mask": torch.ones(b, L, dtype=torch.long), "labels": labels,
        }
    return out


class _LastLoss:
    """The loop's metrics hooks for the benchmark: no timers, only the last micro-step's loss kept."""

    loss = None

    @staticmethod
    def data_wait_timer():
        return contextlib.nullcontext()

    def observe(self, batch, losses) -> None:
        self.loss = losses["loss"].detach()


def run_bench(spec: RunSpec, steps: int, warmup: int, peak_tflops: float | None, breakdown: bool = False,
              trace: str | None = None, cprofile: str | None = None, op_counts: bool = False) -> dict:
    """Time `steps` training steps after `warmup`; `breakdown` adds seconds per model part (one extra step),
    `trace` writes a torch.profiler operator table of one more step to that file, `cprofile` a host profile."""
    from ..model import build_flamingo, count_parameters
    from ..model.flops import batch_shapes, count_step_flops, forward_flops_by_part
    from ..model.vision import tower_image_size
    from ..runtime import build_runtime, device_peak_tflops
    from ..train.loop import optimizer_step
    from ..train.plan import resolve_plan
    from ..train.trainer import build_trainer

    runtime = build_runtime(spec.engine)
    plan = resolve_plan(spec, runtime.world_size, data=False, run_dir=False).with_steps(steps + warmup + 1)
    spec = plan.spec
    meta, _, _ = build_flamingo(spec.model, meta=True)
    size = tower_image_size(meta)
    flops = count_step_flops(meta, batch_shapes(spec, size)) * spec.optim.grad_accum_steps
    fwd_parts = forward_flops_by_part(meta, batch_shapes(spec, size)) if breakdown else None
    del meta
    t_build = time.perf_counter()
    engine = build_trainer(plan, runtime, data=False).engine  # the training start-up, without a loader
    counts = count_parameters(engine.module)
    t_build = time.perf_counter() - t_build
    batches = random_batches(spec, engine.module, size, torch.Generator().manual_seed(0))
    if runtime.device.type == "cuda":
        batches = {k: {n: (t if n == "num_images" else t.pin_memory()) for n, t in b.items()} for k, b in batches.items()}
    weights = {d.name: d.loss_weight for d in spec.data.datasets}
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    feed, last = itertools.repeat(batches), _LastLoss()

    def train_step(mark=None) -> torch.Tensor:
        """The loop's optimizer step (`train.loop.optimizer_step`); with `mark` (--breakdown), its parts marked."""
        if mark is None:
            optimizer_step(engine, feed, weights, runtime, last)
            return last.loss
        for _ in range(engine.grad_accum_steps):
            loss = engine.forward(batches, weights)["loss"]
            mark("head_loss_bwd")
            engine.backward(loss)
        mark("optimizer")
        engine.step()
        return loss.detach()

    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup and runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        losses.append(train_step())
        sync()
        times.append(time.perf_counter() - t)
    synced_time = sorted(times[warmup:])[len(times[warmup:]) // 2]  # median, the host waiting after every step
    back_to_back = time_back_to_back(train_step, steps, runtime.device, sync)
    step_time = sorted(back_to_back)[len(back_to_back) // 2]  # as a training loop runs: no sync between steps
    syncs = count_host_syncs(train_step) if runtime.device.type == "cuda" else None
    ops = count_ops(train_step, runtime.device, sync) if op_counts else {}
    parts = None
    if breakdown:
        if spec.engine.activation_checkpointing:
            raise ValueError("--breakdown does not work with engine.activation_checkpointing (recompute runs in backward)")
        from .step_profile import StepBreakdown, run_profiled_step

        profiler = StepBreakdown(engine.module, runtime.device)
        parts = {k: round(v, 5) for k, v in run_profiled_step(profiler, train_step, sync).items()}
        profiler.remove()
    if trace:
        write_kernel_table(train_step, sync, trace)
    if cprofile:
        write_host_profile(train_step, sync, cprofile)
    samples = sum(d.batch_size for d in spec.data.datasets) * spec.optim.grad_accum_steps
    peak = peak_tflops or device_peak_tflops(runtime.device)
    tflops = flops / step_time / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if runtime.device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu",
        **({"blas": torch.backends.cuda.preferred_blas_library().name.lower()} if runtime.device.type == "cuda" else {}),
        "engine": spec.engine.kind, "zero_stage": spec.engine.zero_stage if spec.engine.kind == "deepspeed" else None,
        "precision": spec.engine.precision, "activation_checkpointing": spec.engine.activation_checkpointing,
        "lm_attention": spec.model.lm.attention, "device_skip": getattr(engine, "device_skip", None),
        "batch": {d.name: [d.batch_size, 1 if d.kind == "laion" else d.max_images, d.effective_max_tokens()] for d in spec.data.datasets},
        "params_total": counts["total"], "params_trainable": counts["trainable"],
        "step_time_s": round(step_time, 4), "samples_per_s": round(samples / step_time, 2),
        "step_time_synced_s": round(synced_time, 4), "samples_per_s_synced": round(samples / synced_time, 2),
        **({"host_syncs_per_step": syncs} if syncs is not None else {}), **ops,
        "fuse_datasets": spec.engine.fuse_datasets,
        "tflop_per_step": round(flops / 1e12, 3), "tflops": round(tflops, 2),
        "peak_tflops": peak, "mfu": round(tflops / peak, 4) if peak else None,
        "peak_mem_gib": round(mem, 2) if mem is not None else None, "steps": steps, "warmup": warmup,
        "step_times_s": [round(t, 4) for t in back_to_back], "step_times_synced_s": [round(t, 4) for t in times[warmup:]],
        "loss_first": round(float(losses[0]), 5), "loss_last": round(float(losses[-1]), 5),
        "build_s": round(t_build, 1), "compile": spec.engine.compile_targets if spec.engine.compile else [],
        "compile_mode": spec.engine.compile_mode if spec.engine.compile else None,
        **({"breakdown_s": parts, "forward_tflop_by_part": {k: round(v / 1e12, 3) for k, v in fwd_parts.items()}} if parts else {}),
    }


def time_back_to_back(train_step, steps: int, device: torch.device, sync) -> list[float]:
    """Seconds per step with the host never waiting between steps (CUDA events at step boundaries, one sync at the
    end): what a training loop without per-step syncs gets. On a CPU, wall time per step."""
    if device.type != "cuda":
        out = []
        for _ in range(steps):
            t = time.perf_counter()
            train_step()
            out.append(time.perf_counter() - t)
        return out
    sync()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    marks[0].record()
    for i in range(steps):
        train_step()
        marks[i + 1].record()
    sync()
    return [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(steps)]


def is_sync_warning(message) -> bool:
    """torch's sync-debug warning ("called a synchronizing CUDA operation"), not the other warnings a step may raise
    (deprecations, cuBLASLt falling back to cuBLAS)."""
    return "called a synchronizing CUDA operation" in str(message)


def count_host_syncs(train_step) -> dict:
    """One step under `torch.cuda.set_sync_debug_mode("warn")`: how many operations made the host wait for the
    device, and where (explicit `torch.cuda.synchronize()` calls are not counted by torch)."""
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if not is_sync_warning(message):  # any other warning of the step is shown as usual
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-3:]
        key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
        sites[key] = sites.get(key, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    torch.cuda.synchronize()
    return {"count": sum(sites.values()), "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:10])}


def count_ops(train_step, device: torch.device, sync) -> dict:
    """What one step asks of the device: aten operators dispatched from this thread (on a GPU the backward runs on
    autograd's device thread, so forward and optimizer only) and, on a GPU, kernels run (torch.profiler). Each
    costs the host a launch whatever its size, so with small work per kernel the host, not the device, sets the pace."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    sync()
    with Counter():
        train_step()
    sync()
    out = {"ops_per_step": Counter.ops}
    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train_step()
            sync()
        out["kernels_per_step"] = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    return out


def write_host_profile(train_step, sync, path: str, rows: int = 60) -> None:
    """cProfile one step (host side: where Python spends the step, waits on the device included) into `path`."""
    import cProfile
    import io
    import pstats

    sync()
    prof = cProfile.Profile()
    prof.enable()
    train_step()
    sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(rows)
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows // 2)
    Path(path).write_text(buf.getvalue())


def write_kernel_table(train_step, sync, path: str, rows: int = 40) -> None:
    """Profile one step with torch.profiler and write its top operators by device time to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=activities) as prof:
        train_step()
        sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=80))


def _rates(text: str):
    """--rates GEMM_TFLOPS,ATTN_TFLOPS,MEM_TBPS -> traffic.Rates."""
    from .traffic import Rates

    try:
        values = [float(x) for x in text.split(",")]
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three positive numbers GEMM_TFLOPS,ATTN_TFLOPS,MEM_TBPS, got '{text}'") from None
    return Rates(*values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batches (CPU smoke run)")
    p.add_argument("--skeleton", action="store_true",
                   help="the recipe's layers, latents and batch shapes at tiny widths (CPU: the host's dispatch cost)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: the device table)")
    p.add_argument("--breakdown", action="store_true", help="add seconds per model part of one step (see perf/step_profile.py)")
    p.add_argument("--trace", default=None, metavar="FILE", help="write a torch.profiler operator table of one step to FILE")
    p.add_argument("--cprofile", default=None, metavar="FILE", help="write a cProfile (host side) of one step to FILE")
    p.add_argument("--count-ops", action="store_true", help="add operators dispatched and kernels run per step (one more step)")
    p.add_argument("--traffic", action="store_true",
                   help="instead of timing: count the bytes and FLOPs of one step on the meta device and project its kernel time (any machine; see perf/traffic.py)")
    p.add_argument("--rates", default=None, type=_rates, metavar="GEMM_TFLOPS,ATTN_TFLOPS,MEM_TBPS",
                   help="achieved device rates for --traffic's projection (default: fitted to the measured H200 step)")
    p.add_argument("--time-gemms", action="store_true",
                   help="with --traffic: also time each of the step's matmul shapes on this machine's device (a GPU: seconds)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.time_gemms or args.rates) and not args.traffic:
        p.error("--time-gemms and --rates go with --traffic")
    with tempfile.TemporaryDirectory() as tmp:
        spec = bench_spec(args.spec, args.overrides, args.tiny, Path(tmp), args.skeleton)
        if args.traffic:
            from .traffic import traffic_report

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.time_gemms else None
            print(json.dumps(traffic_report(spec, args.rates, device)), flush=True)
            return 0
        result = run_bench(spec, args.steps, args.warmup, args.peak_tflops, args.breakdown, args.trace, args.cprofile, args.count_ops)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
