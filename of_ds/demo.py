"""The demo dataset: real photos shipped with scikit-image, captions and documents written to match them.

`tools/make_demo_data OUT` (or `ensure_demo_data(OUT)` from the launcher) writes, deterministically:
- `OUT/laion/{000000..000003}.tar`: img2dataset-style pairs (`key.jpg`, `key.txt`, `key.json`) + `sizes.json`;
- `OUT/raw/`: MMC4-style document shards `docs_shard_{i}_v2.jsonl.zip` and images `raw/images/<i>/<image_name>`,
  converted by `of_ds.convert` into `OUT/mmc4/{000000..000003}.tar` (+ `sizes.json`, `convert_report.json`);
- `OUT/tokenizer/`: a byte-level BPE (vocabulary 1000) trained on every caption and sentence;
- `OUT/lm/`: a small LLaMA-style causal LM pretrained on the same text (a few seconds on the CPU), so the demo
  Flamingo has what the real recipe has: a frozen LM that knows the language, and cross-attention to learn;
- `OUT/vit.pt`: a tiny open_clip ViT (`DEMO_VIT`) pretrained to tell the photos apart, the demo's stand-in for a
  CLIP checkpoint (loaded through open_clip's local-checkpoint path, frozen during training);
- `OUT/photos/<name>.jpg`: each source photo, whole, to caption with `tools/generate` after training;
- `OUT/laion_val/000000.tar` and `OUT/mmc4_val/000000.tar` (+ `sizes.json`): a held-out split made the same way
  with its own random stream after everything else (so the training data and models do not depend on it), for
  the demo spec's `val_shards`;
- `OUT/DONE` last: a directory without it is regenerated.

Every image is a distinct random crop / flip / rescale of one of the photos, JPEG-encoded above the loader's
10 KB floor. In a document each image has one caption-like sentence with CLIP-like similarity ~0.30 and ~0.15 to
the others, so the recipe's 0.24 threshold keeps exactly the right pairs.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import random
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from of_ds.convert import ConvertOptions, convert
from of_ds.convert.tarwriter import DeterministicTar

SEED = 1234
N_SHARDS = 4
LAION_PER_SHARD = 64
DOCS_PER_SHARD = 40
MIN_JPEG_BYTES = 12_000  # above the loader's default min_image_bytes (10,000)
TOKENIZER_VOCAB = 1000
VAL_SEED = SEED + 1
EXPECTED = ("laion", "mmc4", "raw", "tokenizer", "lm", "vit.pt", "photos", "laion_val", "mmc4_val", "DONE")
# torch's intra-op threads while pretraining the demo LM and ViT: how a reduction is split across threads changes its
# float rounding, so a fixed count gives the same bytes wherever the data is generated (a launch's rank 0 with its
# share of the cores, a test process, a many-core machine)
THREADS = 2


@dataclass(frozen=True)
class Photo:
    name: str  # skimage.data function
    subject: tuple[str, ...]  # noun phrases describing the whole picture (any crop of it)
    detail: tuple[str, ...]  # short clauses that may follow the subject


PHOTOS = (
    Photo("astronaut", ("an astronaut in a white space suit", "a smiling astronaut", "a woman astronaut in her suit"),
          ("in front of an american flag", "posing for an official portrait", "holding a space helmet")),
    Photo("coffee", ("a cup of coffee", "a white cup of coffee on a saucer", "a fresh cup of coffee"),
          ("with a spoon on the saucer", "on a red table", "with foam on top")),
    Photo("chelsea", ("a tabby cat", "an orange cat with green eyes", "a ginger cat"),
          ("looking up at the camera", "sitting on the floor", "with long white whiskers")),
    Photo("rocket", ("a rocket on the launch pad", "a space shuttle ready to launch", "a tall white rocket"),
          ("under a blue sky", "next to the launch tower", "before lift off")),
    Photo("stereo_motorcycle", ("a red motorcycle", "a sport motorcycle", "a shiny motorbike"),
          ("parked in a garage", "standing on a gray floor", "with a black seat")),
    Photo("hubble_deep_field", ("galaxies in deep space", "a deep field image of distant galaxies", "a sky full of galaxies"),
          ("seen by a space telescope", "on a black background", "shining in many colors")),
    Photo("immunohistochemistry", ("stained tissue under a microscope", "a microscope slide of cells", "a tissue sample"),
          ("stained brown and blue", "at high magnification", "from a lab")),
    Photo("retina", ("a photo of a human retina", "the back of an eye", "an eye fundus image"),
          ("with red blood vessels", "taken by an eye doctor", "showing the optic disc")),
    Photo("coins", ("old coins", "a collection of silver coins", "rows of antique coins"),
          ("on a gray background", "lying in neat rows", "in black and white")),
    Photo("camera", ("a man with a camera", "a photographer with a tripod", "a cameraman"),
          ("standing in a field", "in black and white", "looking through the camera")),
    Photo("moon", ("the surface of the moon", "craters on the moon", "the gray moon"),
          ("seen through a telescope", "in black and white", "full of craters")),
    Photo("brick", ("a brick wall", "a wall of gray bricks", "bricks and mortar"),
          ("in black and white", "with rough texture", "seen up close")),
    Photo("grass", ("green grass", "a patch of grass", "blades of grass"),
          ("seen up close", "in black and white", "in a field")),
    Photo("gravel", ("gravel stones", "a pile of small stones", "rough gravel"),
          ("on the ground", "in black and white", "seen from above")),
    Photo("page", ("a page of printed text", "an old book page", "a scanned page"),
          ("with small black letters", "in black and white", "from a printed book")),
)

CAPTION_FORMS = ("{s} {d}", "a photo of {s} {d}", "{s}", "a picture of {s}", "close up of {s} {d}", "an image of {s} {d}")
FILLER = (
    "We spent the whole afternoon there.",
    "Here are a few more pictures from the day.",
    "It was a wonderful trip and we learned a lot.",
    "The weather was perfect.",
    "Let me know what you think in the comments.",
    "This is one of my favourite places.",
    "More photos will follow next week.",
    "Thanks for reading this post.",
)
TITLES = ("My photo diary", "Things I saw this week", "A short story in pictures", "Notes from the lab", "Weekend album")


# ---------------------------------------------------------------------------------------------------- images
def load_photos() -> dict[str, np.ndarray]:
    """Every photo as an RGB uint8 array (gray ones stacked to three channels)."""
    import skimage.data

    out = {}
    for p in PHOTOS:
        arr = getattr(skimage.data, p.name)()
        if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out[p.name] = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    return out


def make_variant(arr: np.ndarray, rng: random.Random) -> bytes:
    """A random crop (60-100% of each side), maybe mirrored, resized to 256-320 px, as a JPEG above 12 KB."""
    h, w = arr.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
    im = Image.fromarray(arr[y : y + ch, x : x + cw])
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = rng.choice((256, 288, 320))
    scale = side / min(im.size)
    im = im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale))), Image.BICUBIC)
    noise_seed = rng.randrange(2**32)
    for grain in (0, 3, 6, 10):
        pixels = im
        if grain:  # flat photos (moon, rocket sky) compress below the 10 KB floor; film grain keeps them above
            noise = np.random.default_rng(noise_seed).normal(0, grain, (im.height, im.width, 1))
            pixels = Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        pixels.save(buf, format="JPEG", quality=92)
        if buf.tell() >= MIN_JPEG_BYTES:
            break
    return buf.getvalue()


def make_caption(photo: Photo, rng: random.Random) -> str:
    form = rng.choice(CAPTION_FORMS)
    return form.format(s=rng.choice(photo.subject), d=rng.choice(photo.detail)).strip()


# ----------------------------------------------------------------------------------------------------- LAION
def write_laion(out: Path, photos: dict[str, np.ndarray], rng: random.Random, shards: int = N_SHARDS) -> list[str]:
    """img2dataset-style shards; returns the captions."""
    out.mkdir(parents=True, exist_ok=True)
    captions, sizes = [], {}
    for shard in range(shards):
        name = f"{shard:06d}.tar"
        with DeterministicTar(out / name) as tar:
            for i in range(LAION_PER_SHARD):
                photo = rng.choice(PHOTOS)
                jpg = make_variant(photos[photo.name], rng)
                caption = make_caption(photo, rng)
                key = f"{shard:05d}{i:04d}"
                w, h = Image.open(io.BytesIO(jpg)).size
                meta = {"key": key, "caption": caption, "url": f"https://demo.invalid/{photo.name}/{key}.jpg",
                        "width": w, "height": h, "status": "success", "error_message": None,
                        "sha256": hashlib.sha256(jpg).hexdigest()}
                tar.add(f"{key}.jpg", jpg)
                tar.add(f"{key}.txt", caption.encode())
                tar.add(f"{key}.json", json.dumps(meta).encode())
                captions.append(caption)
        sizes[name] = LAION_PER_SHARD
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return captions


# ------------------------------------------------------------------------------------------------------ MMC4
def make_document(shard: int, k: int, photos: dict[str, np.ndarray], images: Path, rng: random.Random) -> dict:
    """One MMC4-style document: a title, 1-4 images each with its caption-like sentence, filler between."""
    texts = [f"{rng.choice(TITLES)}."]
    infos, caption_at = [], []
    for i in range(rng.randint(1, 4)):
        if rng.random() < 0.6:
            texts.append(rng.choice(FILLER))
        photo = rng.choice(PHOTOS)
        jpg = make_variant(photos[photo.name], rng)
        image_name = hashlib.sha1(f"demo-{shard}-{k}-{i}".encode()).hexdigest() + ".jpg"
        (images / image_name).write_bytes(jpg)
        caption_at.append(len(texts))
        texts.append(make_caption(photo, rng).capitalize() + ".")
        infos.append({"image_name": image_name, "raw_url": f"https://demo.invalid/{photo.name}/{image_name}",
                      "face_detections": None})
    texts.append(rng.choice(FILLER))
    sim = [[round(0.30 + rng.uniform(-0.03, 0.03) if j == at else 0.15 + rng.uniform(-0.04, 0.04), 4)
            for j in range(len(texts))] for at in caption_at]
    for info, row, at in zip(infos, sim, caption_at):
        info["matched_text_index"], info["matched_sim"] = at, row[at]
    return {"url": f"https://demo.invalid/doc/{shard}/{k}", "text_list": texts, "image_info": infos,
            "similarity_matrix": sim, "could_have_url_duplicate": 0}


def write_mmc4_raw(raw: Path, photos: dict[str, np.ndarray], rng: random.Random, shards: range = range(N_SHARDS)) -> list[str]:
    """MMC4 download layout under `raw/`; returns every sentence."""
    sentences = []
    for shard in shards:
        images = raw / "images" / str(shard)
        images.mkdir(parents=True, exist_ok=True)
        docs = [make_document(shard, k, photos, images, rng) for k in range(DOCS_PER_SHARD)]
        sentences += [t for d in docs for t in d["text_list"]]
        name = f"docs_shard_{shard}_v2.jsonl"
        info = zipfile.ZipInfo(name, date_time=(2023, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(raw / f"{name}.zip", "w") as zf:
            zf.writestr(info, "".join(json.dumps(d) + "\n" for d in docs))
    return sentences


DEMO_LM = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
LM_STEPS, LM_BATCH, LM_LR = 300, 64, 3e-3


def pretrain_demo_lm(texts: list[str], tokenizer_dir: Path, out: Path) -> Path:
    """Train the demo's causal LM on `texts` (each followed by eos) and save it as an HF model dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(SEED)
    config = AutoConfig.for_model(**DEMO_LM, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    ids = [tok(t + tok.eos_token).input_ids[:64] for t in sorted(set(texts))]
    opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LM_LR, total_steps=LM_STEPS, pct_start=0.1)
    rng = random.Random(SEED)
    model.train()
    for _ in range(LM_STEPS):
        batch = [ids[rng.randrange(len(ids))] for _ in range(LM_BATCH)]
        width = max(map(len, batch))
        input_ids = torch.tensor([b + [tok.eos_token_id] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    return out


DEMO_VIT_NAME = "demo-vit-tiny"
DEMO_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
VIT_STEPS, VIT_BATCH, VIT_LR, VIT_VIEWS = 150, 32, 2e-3, 16


def pretrain_demo_vit(photos: dict[str, np.ndarray], out: Path) -> Path:
    """Train the demo ViT to classify which photo a random crop comes from; save the open_clip state dict."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from of_ds.model.vision import register_open_clip_config

    register_open_clip_config(DEMO_VIT_NAME, DEMO_VIT)
    torch.manual_seed(SEED)
    clip = open_clip.create_model(DEMO_VIT_NAME, pretrained=None)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    rng = random.Random(SEED)
    views, labels = [], []
    for label, p in enumerate(PHOTOS):  # random crops, resized straight to 224 (no JPEG round trip: fast)
        arr = photos[p.name]
        h, w = arr.shape[:2]
        for _ in range(VIT_VIEWS):
            side = int(min(h, w) * rng.uniform(0.5, 1.0))
            y, x = rng.randint(0, h - side), rng.randint(0, w - side)
            im = Image.fromarray(arr[y : y + side, x : x + side]).resize((224, 224), Image.BICUBIC)
            views.append((torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 - mean) / std)
            labels.append(label)
    views, labels = torch.stack(views), torch.tensor(labels)
    head = torch.nn.Linear(DEMO_VIT["embed_dim"], len(PHOTOS))
    params = list(clip.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=VIT_LR)
    gen = torch.Generator().manual_seed(SEED)
    clip.visual.train()
    for _ in range(VIT_STEPS):
        idx = torch.randint(len(views), (VIT_BATCH,), generator=gen)
        x = views[idx]
        flip = torch.rand(VIT_BATCH, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = F.cross_entropy(head(clip.visual(x)), labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save(clip.state_dict(), out)
    return out


def write_photos(out: Path, photos: dict[str, np.ndarray]) -> None:
    """Each whole photo, shorter side 256 px, for users to caption after training."""
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in photos.items():
        im = Image.fromarray(arr)
        scale = 256 / min(im.size)
        im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC).save(out / f"{name}.jpg", quality=92)


# ------------------------------------------------------------------------------------------------------- all
def make_demo_data(out: str | Path) -> Path:
    """(Re)generate the whole demo directory; `DONE` is written last. The caller's random states (torch, numpy,
    Python) and torch's thread count are left as they were: launch/train.py generates the data on a first run just
    before it builds the model, whose init must not depend on whether this run was the one that generated it."""
    import torch

    state, threads = (random.getstate(), np.random.get_state()), torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            return _make_demo_data(Path(out))
    finally:
        torch.set_num_threads(threads)
        random.setstate(state[0])
        np.random.set_state(state[1])


def _make_demo_data(out: Path) -> Path:
    from of_ds.model.tokenizer import train_bpe_tokenizer

    _clear_partial(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    photos = load_photos()
    captions = write_laion(out / "laion", photos, rng)
    sentences = write_mmc4_raw(out / "raw", photos, rng)
    convert(ConvertOptions(
        inputs=str(out / "raw" / f"docs_shard_{{0..{N_SHARDS - 1}}}_v2.jsonl.zip"), image_dir=str(out / "raw" / "images"),
        output_dir=str(out / "mmc4"), image_layout="number", progress=False,
    ))
    train_bpe_tokenizer(captions + sentences, out / "tokenizer", vocab_size=TOKENIZER_VOCAB)
    pretrain_demo_lm(captions + sentences, out / "tokenizer", out / "lm")
    pretrain_demo_vit(photos, out / "vit.pt")
    write_photos(out / "photos", photos)
    write_validation_split(out, photos)
    (out / "DONE").write_text("demo data complete\n")
    return out


def write_validation_split(out: Path, photos: dict[str, np.ndarray]) -> None:
    """One held-out shard of each kind; the MMC4 one converted from raw shard N_SHARDS (which training skips)."""
    rng = random.Random(VAL_SEED)
    write_laion(out / "laion_val", photos, rng, shards=1)
    write_mmc4_raw(out / "raw", photos, rng, shards=range(N_SHARDS, N_SHARDS + 1))
    convert(ConvertOptions(
        inputs=str(out / "raw" / f"docs_shard_{N_SHARDS}_v2.jsonl.zip"), image_dir=str(out / "raw" / "images"),
        output_dir=str(out / "mmc4_val"), image_layout="number", progress=False,
    ))


def ensure_demo_data(path: str | Path) -> Path:
    """Generate the demo data at `path` unless it is complete. Safe when several ranks call it at once: one
    generates under an exclusive file lock while the others wait for it, then all see `DONE`."""
    path = Path(path)
    if demo_data_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not demo_data_complete(path):
            make_demo_data(path)
    return path


def demo_data_complete(path: str | Path) -> bool:
    """`DONE` and every part (a demo dir from before the validation split is made anew)."""
    path = Path(path)
    return (path / "DONE").is_file() and all((path / name).exists() for name in EXPECTED)


def _clear_partial(out: Path) -> None:
    """Remove a half-written demo dir, refusing to touch a directory that holds anything else."""
    if not out.exists():
        return
    strangers = sorted(p.name for p in out.iterdir() if p.name not in EXPECTED)
    if strangers:
        raise FileExistsError(f"{out}: exists and holds files that are not demo data ({', '.join(strangers[:5])}); pick another path")
    shutil.rmtree(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_demo_data", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="Output directory (e.g. demo_data)")
    p.add_argument("--force", action="store_true", help="Regenerate even if OUT/DONE exists")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.force and (out / "DONE").exists():
        (out / "DONE").unlink()
    try:
        ensure_demo_data(out)
    except FileExistsError as e:
        print(f"make_demo_data: error: {e}", file=sys.stderr)
        return 2
    print(f"demo data ready in {out}/: laion/ mmc4/ tokenizer/ (raw MMC4-style inputs in raw/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
