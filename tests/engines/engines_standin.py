"""A tiny spec, a deterministic stand-in for `TrainData` (same protocol) and a stand-in step folder, for engine and
start-up tests without shards or a trained run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

TINY_MODEL = {
    "vision": {
        "name": "engines-vit-tiny",
        "pretrained": None,
        "config": {  # QuickGELU, as the recipes' OpenAI tower: every engine path runs it folded (fold_quick_gelu)
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1},
        },
    },
    "lm": {
        "name_or_path": None,
        "config": {
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
        },
    },
    "perceiver": {"depth": 1, "heads": 2, "dim_head": 16, "num_latents": 4},
    "cross_attn": {"every_n_layers": 1, "heads": 2, "dim_head": 16},
    "offline": True,
}


def tiny_spec_dict(tokenizer_dir: str, out_dir: str, **sections) -> dict:
    d = {
        "model": {**copy.deepcopy(TINY_MODEL), "tokenizer": tokenizer_dir},
        "data": {"datasets": [
            {"name": "laion", "kind": "laion", "shards": "unused-{0..1}.tar", "batch_size": 3, "loss_weight": 0.2, "max_tokens": 12, "workers": 0},
            {"name": "mmc4", "kind": "mmc4", "shards": "unused-{0..1}.tar", "batch_size": 2, "max_images": 2, "max_tokens": 16, "workers": 0},
        ]},
        "optim": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1, "grad_accum_steps": 1},
        "engine": {"kind": "deepspeed", "precision": "fp32", "zero_stage": 0},
        "checkpoint": {"every_n_steps": 2, "keep_last": 2},
        "logging": {"every_n_steps": 1, "progress_bar": False},
        "run": {"name": "t", "output_dir": out_dir, "seed": 0, "max_steps": 4},
    }
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return d


class StandInData:
    """Batches are a pure function of (seed, rank, epoch, index): resume = remember the index."""

    def __init__(self, spec, tokenizer, rank: int = 0, steps_per_epoch: int = 6, image_size: int = 32):
        self.spec, self.rank, self.steps_per_epoch, self.size = spec, rank, steps_per_epoch, image_size
        self.media = tokenizer.convert_tokens_to_ids("<image>")
        self.eoc = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
        self.pad = tokenizer.pad_token_id
        self.vocab = tokenizer.vocab_size  # base ids only; the added tokens are placed explicitly
        self.epoch, self.index = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = epoch, 0

    def _batch(self, ds, g: torch.Generator) -> dict:
        from of_ds.model.labels import build_labels

        b, L = ds.batch_size, ds.effective_max_tokens()
        t = 1 if ds.kind == "laion" else ds.max_images
        ids = torch.randint(5, self.vocab, (b, L), generator=g)
        ids[:, 0] = self.media
        ids[:, L // 2] = self.eoc
        if t > 1:
            ids[:, L // 2 + 1] = self.media
        mask = torch.ones(b, L, dtype=torch.long)
        mask[0, -2:] = 0
        ids[0, -2:] = self.pad
        return {
            "pixel_values": torch.randn(b, t, 3, self.size, self.size, generator=g),
            "num_images": torch.full((b,), t, dtype=torch.long),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": build_labels(ids, mask, ds.kind, self.media, self.eoc, self.pad),
        }

    def __iter__(self):
        while self.index < self.steps_per_epoch:
            g = torch.Generator().manual_seed(hash((self.spec.run.seed, self.rank, self.epoch, self.index)) % 2**31)
            self.index += 1
            yield {ds.name: self._batch(ds, g) for ds in self.spec.data.datasets}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

    def drop_counts(self) -> dict:
        return {ds.name: {} for ds in self.spec.data.datasets}


def shutdown_process_group() -> None:
    """End a driver cleanly: gloo's worker threads, still running at interpreter exit, can abort it ("terminate
    called without an active exception"), failing a run that already wrote its results."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def checkpoint_of(spec, step: int = 4, world_size: int = 1) -> Path:
    """A complete step folder in `spec`'s run dir as a save leaves it, as far as the start-up reads it: spec.yaml,
    meta.json (the spec's engine and ZeRO stage, `world_size` ranks) and COMPLETE; no weights."""
    from of_ds.train.checkpoint import COMPLETE, step_dir_name

    path = spec.run.run_dir / "checkpoints" / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "spec.yaml").write_text(spec.to_yaml())
    e = spec.engine
    (path / "meta.json").write_text(json.dumps({"engine": e.kind, "zero_stage": e.zero_stage, "world_size": world_size, "step": step}))
    (path / COMPLETE).write_text(f"{step}\n")
    return path
