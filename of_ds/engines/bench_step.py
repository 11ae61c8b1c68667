"""`tools/bench_step --spec launch/specs/openflamingo-3b.yaml`: time training steps of a spec's model on random
batches of its shapes, and print one JSON line (step time, samples/s, TFLOP/s, MFU, peak memory).

Nothing is downloaded: an LM given by hub name is replaced by a randomly initialised MPT-1B-class config (the
recipe's: d_model 2048, 24 layers, 16 heads, vocab 50432), the vision tower is built unpretrained, and the tokenizer
is a local word-level vocabulary of the LM's size. `--tiny` shrinks model and batches so it runs on a CPU.
FLOPs come from `of_ds.model.flops.count_step_flops` (forward + backward, every image slot counted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..spec import RunSpec

MPT_1B = {"model_type": "mpt", "d_model": 2048, "n_layers": 24, "n_heads": 16, "vocab_size": 50432, "max_seq_len": 2048, "expansion_ratio": 4}
MPT_1B_TOKENS = 50277  # GPT-NeoX tokenizer size; the matrix is padded to 50432
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


def bench_spec(spec_path: str, overrides: list[str], tiny: bool, tmp: Path) -> RunSpec:
    spec = RunSpec.from_yaml(spec_path, (TINY_SETS if tiny else []) + overrides)
    data = spec.to_dict()
    m = data["model"]
    m["offline"] = True
    m["vision"]["pretrained"] = None
    if m["lm"]["config"] is None:
        m["lm"].update(config=dict(MPT_1B), name_or_path=None, trust_remote_code=False)
    lm_vocab = m["lm"]["config"].get("vocab_size", 1000 if tiny else MPT_1B["vocab_size"])
    n_tokens = min(MPT_1B_TOKENS, lm_vocab) if not tiny else lm_vocab - 8
    m["tokenizer"] = str(synthetic_tokenizer(n_tokens, tmp / "tokenizer"))
    if tiny:
        for d in data["data"]["datasets"]:
            d.update(batch_size=min(d["batch_size"], 4 if d["kind"] == "laion" else 2), workers=0,
                     max_images=min(d.get("max_images", 6), 2), max_tokens=32 if d["kind"] == "laion" else 64)
    data["run"]["output_dir"] = str(tmp / "runs")
    return RunSpec.from_dict(data)


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


def run_bench(spec: RunSpec, steps: int, warmup: int, peak_tflops: float | None) -> dict:
    from ..model import build_flamingo, count_parameters
    from ..model.flops import count_step_flops
    from ..runtime import build_runtime
    from ..train.metrics import device_peak_tflops
    from ..train.session import batch_shapes, seed_everything
    from . import build_engine
    from .deepspeed_config import resolve_deepspeed_config

    runtime = build_runtime(spec.engine)
    ds_config = None
    if spec.engine.kind == "deepspeed":
        ds_config, spec = resolve_deepspeed_config(spec, runtime.world_size)
    seed_everything(spec.run.seed)
    meta, _, _ = build_flamingo(spec.model, meta=True)
    size = meta.vision_encoder.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    flops = count_step_flops(meta, batch_shapes(spec, size)) * spec.optim.grad_accum_steps
    del meta
    model, _, _ = build_flamingo(spec.model)
    counts = count_parameters(model)
    engine = build_engine(model, spec, runtime, total_steps=steps + warmup, ds_config=ds_config)
    batches = random_batches(spec, engine.module, size, torch.Generator().manual_seed(0))
    weights = {d.name: d.loss_weight for d in spec.data.datasets}
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        if i == warmup and runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        for _ in range(engine.grad_accum_steps):
            engine.backward(engine.forward(batches, weights)["loss"])
        engine.step()
        sync()
        times.append(time.perf_counter() - t)
    step_time = sorted(times[warmup:])[len(times[warmup:]) // 2]  # median
    samples = sum(d.batch_size for d in spec.data.datasets) * spec.optim.grad_accum_steps
    peak = peak_tflops or device_peak_tflops(runtime.device)
    tflops = flops / step_time / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if runtime.device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu",
        "engine": spec.engine.kind, "zero_stage": spec.engine.zero_stage if spec.engine.kind == "deepspeed" else None,
        "precision": spec.engine.precision, "activation_checkpointing": spec.engine.activation_checkpointing,
        "batch": {d.name: [d.batch_size, 1 if d.kind == "laion" else d.max_images, d.effective_max_tokens()] for d in spec.data.datasets},
        "params_total": counts["total"], "params_trainable": counts["trainable"],
        "step_time_s": round(step_time, 4), "samples_per_s": round(samples / step_time, 2),
        "tflop_per_step": round(flops / 1e12, 3), "tflops": round(tflops, 2),
        "peak_tflops": peak, "mfu": round(tflops / peak, 4) if peak else None,
        "peak_mem_gib": round(mem, 2) if mem is not None else None, "steps": steps, "warmup": warmup,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batches (CPU smoke run)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: the device table)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        spec = bench_spec(args.spec, args.overrides, args.tiny, Path(tmp))
        result = run_bench(spec, args.steps, args.warmup, args.peak_tflops)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
