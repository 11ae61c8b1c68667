"""`tools/bench_data`: samples/s of one dataset's loader on real shards, as one JSON line.

    tools/bench_data --kind laion --shards 'data/laion/{000000..000009}.tar' --tokenizer DIR \\
        --vision ViT-L-14 --batch-size 64 --workers 4 --batches 20

The first batches are a warm-up (worker start, shuffle buffer fill; one by default) and are not timed. With
`--warmup-batches` past shuffle_buffer / batch_size the shuffle buffer is full: the steady state of a long run.
`cpu_ms_per_sample`: CPU time of the main process and its workers per timed sample. The JSON line names the decode
path it used (`decode`: exact, the default; exact-pil, `--decode exact-pil`: Pillow
resizes the whole image; fast, `--decode fast`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

from ..spec import RunSpec


def vision_image_config(name: str) -> dict:
    """The eval-transform numbers of an open_clip model, from its config (no weights are created)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise SystemExit(f"--vision: unknown open_clip model '{name}'")
    vision = cfg["vision_cfg"]
    pp = merge_preprocess_dict(PreprocessCfg(size=vision.get("image_size", 224)), cfg.get("preprocess_cfg", {}))
    size = pp["size"]
    return {"image_size": (size, size) if isinstance(size, int) else tuple(size), "mean": pp["mean"], "std": pp["std"],
            "interpolation": pp["interpolation"], "resize_mode": pp["resize_mode"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_data", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["laion", "mmc4", "chatgpt"], required=True)
    p.add_argument("--shards", required=True, help="brace pattern, glob or pipe: command")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer dir (the Flamingo tokens are added)")
    p.add_argument("--vision", default="ViT-L-14", help="open_clip model whose eval transform to use")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=20, help="timed batches (after the warm-up batches)")
    p.add_argument("--warmup-batches", type=int, default=1,
                   help="untimed batches first; past shuffle_buffer / batch_size of them the buffer is full (steady state)")
    p.add_argument("--decode", choices=["exact", "exact-pil", "fast"], default=None,
                   help="image decode path: exact (decode_draft false), exact-pil (also decode_resize full: Pillow "
                   "resizes the whole image) or fast (decode_draft true); default: the spec's default, exact")
    p.add_argument("--no-draft", dest="decode", action="store_const", const="exact", help="same as --decode exact")
    p.add_argument("--sim-threshold", type=float, default=0.24)
    p.add_argument("--shuffle-buffer", type=int, default=5000)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the loader workers): a throughput measure
    that a loaded machine disturbs much less than wall time."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from ..model.tokenizer import load_tokenizer
    from . import build_train_data

    dataset = {
        "name": args.kind, "kind": args.kind, "shards": args.shards, "batch_size": args.batch_size,
        "workers": args.workers, "resampled": True, "samples_per_epoch": (args.batches + args.warmup_batches) * args.batch_size,
        "shuffle_buffer": args.shuffle_buffer, "shuffle_initial": min(1000, args.shuffle_buffer),
        "sim_threshold": args.sim_threshold,
    }
    if args.decode is not None:
        dataset["decode_draft"] = args.decode == "fast"
        dataset["decode_resize"] = "full" if args.decode == "exact-pil" else "crop"
    spec = RunSpec.from_dict({"data": {"datasets": [dataset]}, "run": {"seed": args.seed}})
    runtime = types.SimpleNamespace(rank=0, world_size=1, local_rank=0)
    draft, resize = spec.data.datasets[0].decode_draft, spec.data.datasets[0].decode_resize
    data = build_train_data(spec, load_tokenizer(args.tokenizer, offline=True), vision_image_config(args.vision), runtime)
    started = time.perf_counter()
    iterator = iter(data)
    for _ in range(max(1, args.warmup_batches)):
        next(iterator)
    first, cpu_first = time.perf_counter(), tree_cpu_seconds()
    batches, cpu_last = 0, cpu_first
    for _ in iterator:
        batches, cpu_last = batches + 1, tree_cpu_seconds()  # before the workers exit with the epoch's end
    seconds = time.perf_counter() - first
    samples = batches * args.batch_size
    print(json.dumps({
        "kind": args.kind, "samples_per_s": round(samples / seconds, 2) if seconds else None,
        "samples_per_s_per_worker": round(samples / seconds / max(1, args.workers), 2) if seconds else None,
        "samples": samples, "seconds": round(seconds, 3), "warmup_seconds": round(first - started, 3),
        "cpu_ms_per_sample": round(1000 * (cpu_last - cpu_first) / samples, 2) if samples else None,
        "batch_size": args.batch_size, "workers": args.workers,
        "decode": "fast" if draft else "exact" if resize == "crop" else "exact-pil", "draft": draft, "resize": resize,
        "drops": data.drop_counts()[args.kind],
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
