"""The demo dataset: deterministic, readable, and shaped so the loaders' rules keep the right images and pairs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from of_ds.demo import EXPECTED

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(shared_demo_data) -> Path:
    """The session's demo dataset: two processes regenerated it at once over a killed run's half-written dir."""
    generation = shared_demo_data
    assert generation.exit_codes == (0, 0), generation.stderr
    # generating leaves the caller's random states alone: a first training run on demo data inits its model as
    # any later run does (launch/train.py builds the model right after generating)
    assert generation.random_states_untouched == (True, True)
    return generation.path


def test_layout_and_contents(demo):
    assert (demo / "DONE").is_file()
    for kind in ("laion", "mmc4"):
        sizes = json.loads((demo / kind / "sizes.json").read_text())
        assert sorted(sizes) == [f"{i:06d}.tar" for i in range(4)]
    laion = tarfile.open(demo / "laion/000000.tar")
    names = laion.getnames()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"] and len(names) == 3 * 64
    report = json.loads((demo / "mmc4/convert_report.json").read_text())
    assert report["documents_written"] == report["documents_read"] == 160 and report["images_found"] == report["images_referenced"]
    jpegs, distinct = 0, set()
    for kind in ("laion", "mmc4"):
        for shard in sorted((demo / kind).glob("*.tar")):
            with tarfile.open(shard) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".jpg"):
                        data = tf.extractfile(m).read()
                        assert len(data) > 10_000, m.name  # survives the loader's min_image_bytes
                        assert min(Image.open(io.BytesIO(data)).size) >= 256
                        distinct.add(hashlib.sha256(data).hexdigest())
                        jpegs += 1
    assert jpegs == 256 + report["images_found"] and len(distinct) == jpegs
    # the held-out split: one shard of each kind, none of its images in the training shards
    assert json.loads((demo / "laion_val" / "sizes.json").read_text()) == {"000000.tar": 64}
    assert json.loads((demo / "mmc4_val" / "sizes.json").read_text()) == {"000000.tar": 40}
    for kind in ("laion_val", "mmc4_val"):
        with tarfile.open(demo / kind / "000000.tar") as tf:
            held_out = {hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in tf.getmembers() if m.name.endswith(".jpg")}
        assert held_out and not held_out & distinct


def test_similarities_pick_each_images_caption(demo):
    with tarfile.open(demo / "mmc4/000001.tar") as tf:
        docs = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(docs) == 40 and {len(d["image_info"]) for d in docs} == {1, 2, 3, 4}
    for d in docs:
        for info, row in zip(d["image_info"], d["similarity_matrix"]):
            above = [j for j, s in enumerate(row) if s >= 0.24]
            assert above == [info["matched_text_index"]]  # the recipe's threshold keeps exactly the caption
            assert len(row) == len(d["text_list"]) and "member" in info


def test_tokenizer_loads_with_flamingo_tokens(demo):
    from of_ds.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(demo / "tokenizer"), offline=True)
    assert 600 <= len(tok) <= 1010  # BPE stops early once the small corpus has no merges left
    ids = tok("<image>an astronaut in a white space suit<|endofchunk|>")["input_ids"]
    assert tok.convert_tokens_to_ids("<image>") in ids and len(ids) < 20  # BPE learned the captions' words


def test_two_processes_regenerate_a_partial_dir(demo, shared_demo_data, demo_data_digest):
    """Both processes end with the one complete dataset, the killed run's leftovers gone. (That a generation is the
    same byte for byte wherever it runs: the README test compares `make demo`'s with this one.)"""
    assert (demo / "laion/000000.tar").read_bytes() != shared_demo_data.stale_bytes
    assert tarfile.is_tarfile(demo / "laion/000000.tar")
    assert sorted(p.name for p in demo.iterdir()) == sorted(EXPECTED)
    assert len(demo_data_digest(demo)) > 400


def test_demo_spec_loaders_fill_batches(demo):
    """launch/specs/demo.yaml's datasets, pointed at this demo dir, give full batches that keep most documents, and
    full held-out batches."""
    import types

    from of_ds.data import build_stream_plan
    from of_ds.data.held_out import held_out_batches
    from of_ds.data.images import ImageSpec
    from of_ds.data.stream import worker_batches
    from of_ds.model.tokenizer import load_tokenizer
    from of_ds.spec import RunSpec

    spec = RunSpec.from_yaml(REPO / "launch/specs/demo.yaml", overrides=[
        f"data.datasets.laion.shards={demo}/laion/{{000000..000003}}.tar",
        f"data.datasets.mmc4.shards={demo}/mmc4/{{000000..000003}}.tar"])
    tok = load_tokenizer(str(demo / "tokenizer"), offline=True)
    image_spec = ImageSpec((64, 64), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic", "shortest")
    runtime = types.SimpleNamespace(rank=0, world_size=1, local_rank=0)
    for name in ("laion", "mmc4"):
        ds = spec.dataset(name)
        held_out = list(held_out_batches(ds.model_copy(update={"val_shards": f"{demo}/{name}_val/000000.tar"}), 0, tok, image_spec, 0, 2))
        assert len(held_out) == ds.val_batches and all(b["input_ids"].shape[0] == ds.batch_size for b in held_out)
        batches = list(worker_batches(build_stream_plan(ds, 0, tok, image_spec, runtime), 0, 0, 0, 6))
        drops = sum(sum(b["_meta"][2].values()) for b in batches)
        assert drops <= 6 * ds.batch_size // 2, (name, [b["_meta"][2] for b in batches])  # single-image coin flips only
        for b in batches:
            assert b["num_images"].min() >= 1 and (b["labels"] != -100).any()
            if name == "mmc4":
                media = tok.convert_tokens_to_ids("<image>")
                assert ((b["input_ids"] == media).sum(1) == b["num_images"]).all()


def test_demo_spec_builds_the_vit_that_make_demo_data_pretrains():
    """launch/specs/demo.yaml loads demo_data/vit.pt: its open_clip config must be the one the weights were made for."""
    from of_ds.demo import DEMO_VIT, DEMO_VIT_NAME
    from of_ds.spec import RunSpec

    vision = RunSpec.from_yaml(REPO / "launch" / "specs" / "demo.yaml").model.vision
    assert (vision.name, vision.config, vision.pretrained) == (DEMO_VIT_NAME, DEMO_VIT, "demo_data/vit.pt")
