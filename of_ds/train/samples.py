"""Sample captions at each evaluation: what the model says about a few fixed validation images.

The images are the first `logging.samples` pairs of the first laion dataset with `val_shards` (each prompted with
`<image>`, as its training text begins), and the interleaved prompt is the first document of the first mmc4/chatgpt
dataset with `val_shards` that has two images or more, cut after its last kept `<image>`. Both are read once, the
same on every rank, with the loaders' own image transform (no flip).

Decoding is greedy and always runs `logging.sample_max_new_tokens` steps, the continuation cut at the first
`<|endofchunk|>` or end-of-text afterwards: every rank makes the same number of forward passes, which ZeRO-3 (parameters gathered
per module as it runs) needs. Under FSDP the root's own parameters are unsharded around it.

Rank 0 writes `RUN_DIR/samples/step-{N:08d}.jsonl` (one record per prompt: its images under `samples/images/`, the
prompt, the reference text and the model's continuation) and, with wandb on, a `samples` table.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.drops import DataStalledError, DropCounter
from ..data.held_out import held_out_plan
from ..data.images import ImageTransform, as_image_spec
from ..data.stream import prepared_samples, shard_order
from ..data.tokens import EOC, MEDIA
from ..runtime import Runtime
from ..spec import RunSpec

SAMPLES_DIR = "samples"
MAX_DOCUMENTS_LOOKED_AT = 50


@dataclass
class Prompt:
    kind: str  # "caption" or "interleaved"
    key: str
    text: str  # with one <image> per image
    reference: str  # what the data says follows (a caption, the rest of the document)
    images: list[bytes]


def sample_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"step-{step:08d}.jsonl"


def _first_items(ds, spec: RunSpec, tokenizer, image_processor_cfg, limit: int):
    """The first `limit` prepared items of `ds`'s held-out stream as one rank of one sees it (no repeats)."""
    plan = held_out_plan(ds, spec.run.seed, tokenizer, image_processor_cfg, 0, 1)
    seen = set()
    counter = DropCounter(ds.name, plan.max_consecutive_drops)
    for item in prepared_samples(plan, shard_order(plan, 0, 0), counter):
        if item.key in seen or len(seen) >= limit:
            return
        seen.add(item.key)
        yield item


def caption_prompts(spec: RunSpec, tokenizer, image_processor_cfg) -> list[Prompt]:
    ds = next((d for d in spec.data.datasets if d.kind == "laion" and d.val_shards is not None), None)
    if ds is None:
        return []
    return [Prompt("caption", p.key, MEDIA, p.caption, [p.image])
            for p in _first_items(ds, spec, tokenizer, image_processor_cfg, spec.logging.samples)]


def interleaved_prompt(spec: RunSpec, tokenizer, image_processor_cfg) -> Optional[Prompt]:
    ds = next((d for d in spec.data.datasets if d.kind != "laion" and d.val_shards is not None), None)
    if ds is None:
        return None
    docs = list(_first_items(ds, spec, tokenizer, image_processor_cfg, MAX_DOCUMENTS_LOOKED_AT))
    doc = next((d for d in docs if len(d.images) >= 2), docs[0] if docs else None)
    if doc is None:
        return None
    k = min(len(doc.images), ds.max_images)
    cut = doc.anchors[k - 1] + len(MEDIA)
    rest = doc.text[cut:].split(EOC)[0].strip()
    return Prompt("interleaved", doc.key, doc.text[:cut], rest, list(doc.images[:k]))


@contextlib.contextmanager
def root_unsharded(model):
    """FSDP2: the root's own parameters gathered while the model is driven from outside its forward."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class SampleSet:
    def __init__(self, prompts: list[Prompt], tokenizer, image_processor_cfg, run_dir: Path, runtime: Runtime, max_new_tokens: int):
        self.prompts, self.tokenizer, self.run_dir, self.rt = prompts, tokenizer, Path(run_dir), runtime
        self.max_new_tokens = max_new_tokens
        self.transform = ImageTransform(as_image_spec(image_processor_cfg))

    @classmethod
    def build(cls, spec: RunSpec, tokenizer, image_processor_cfg, run_dir: Path, runtime: Runtime) -> "SampleSet":
        try:
            prompts = caption_prompts(spec, tokenizer, image_processor_cfg)
            interleaved = interleaved_prompt(spec, tokenizer, image_processor_cfg)
        except DataStalledError as e:
            raise DataStalledError(f"logging.samples: {e}") from None
        return cls(prompts + ([interleaved] if interleaved else []), tokenizer, image_processor_cfg, run_dir, runtime,
                   spec.logging.sample_max_new_tokens)

    def _pixels(self, prompts: list[Prompt]) -> torch.Tensor:
        h, w = self.transform.size
        out = np.zeros((len(prompts), max(len(p.images) for p in prompts), 3, h, w), dtype=np.float32)
        for i, p in enumerate(prompts):
            for j, image in enumerate(p.images):
                self.transform(image, out[i, j], False)
        return torch.from_numpy(out)

    def _continue(self, model, prompts: list[Prompt]) -> list[str]:
        """Greedy continuations of prompts of equal token length (one batch)."""
        enc = self.tokenizer([p.text for p in prompts], return_tensors="pt")
        device = self.rt.device
        with root_unsharded(model):
            out = model.generate(self._pixels(prompts).to(device), enc.input_ids.to(device), enc.attention_mask.to(device),
                                 max_new_tokens=self.max_new_tokens, eos_token_id=-1,
                                 num_images=[len(p.images) for p in prompts])
        stops = {model.eoc_token_id, self.tokenizer.eos_token_id}
        texts = []
        for row in out[:, enc.input_ids.shape[1]:].tolist():
            row = row[: next((i for i, t in enumerate(row) if t in stops), len(row))]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def generate(self, model, step: int) -> list[dict]:
        """Collective under ZeRO-3 and FSDP (every rank calls it): -> one record per prompt."""
        captions = [p for p in self.prompts if p.kind == "caption"]
        others = [p for p in self.prompts if p.kind != "caption"]
        texts = self._continue(model, captions) if captions else []
        for p in others:  # prompts of their own lengths: one at a time, no padding
            texts += self._continue(model, [p])
        return [{"step": step, "kind": p.kind, "key": p.key, "images": self._image_names(i, p), "prompt": p.text,
                 "reference": p.reference, "output": t}
                for i, (p, t) in enumerate(zip(captions + others, texts))]

    @staticmethod
    def _image_names(i: int, p: Prompt) -> list[str]:
        return [f"images/{i}-{j}.jpg" for j in range(len(p.images))]

    def write(self, records: list[dict], step: int, loggers=None) -> Path:
        """Rank 0: the step's file (the images once), then to `loggers` (train/loggers.py: a wandb table, TensorBoard
        images and text)."""
        from PIL import Image

        folder = self.run_dir / SAMPLES_DIR
        (folder / "images").mkdir(parents=True, exist_ok=True)
        prompts = [p for p in self.prompts if p.kind == "caption"] + [p for p in self.prompts if p.kind != "caption"]
        for record, p in zip(records, prompts):
            for name, image in zip(record["images"], p.images):
                if not (folder / name).is_file():
                    im = Image.open(io.BytesIO(image)).convert("RGB")
                    im.thumbnail((256, 256))
                    im.save(folder / name, quality=90)
        path = sample_file(self.run_dir, step)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)
        if loggers is not None:
            loggers.log_samples(step, records, folder)
        return path
