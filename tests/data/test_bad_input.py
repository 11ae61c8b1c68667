"""Bad data is skipped and counted by reason; our own bugs propagate; a loader that only drops stops."""

import json
import tarfile

import numpy as np
import pytest

from of_ds.data import DataStalledError

from .helpers import (jpeg, laion_members, mmc4_base64_members, mmc4_doc, mmc4_member_members, run_dataset,
                      write_tar)


@pytest.fixture(scope="module")
def good_doc(photos):
    return mmc4_doc(["a.", "b."], [photos["rocket"], photos["coffee"]], [[0.3, 0.1], [0.1, 0.3]])


def test_every_bad_mmc4_case_is_counted_by_its_reason(tmp_path, tokenizer, photos, good_doc):
    tiny = jpeg(np.zeros((8, 8, 3), "uint8"))
    corrupt = photos["coffee"][:2000] + b"\x00" * 12000  # a JPEG header, then garbage: above the size floor
    bad_b64 = mmc4_base64_members("badb64", good_doc)
    d = json.loads(bad_b64[0][1])
    d["image_info"][0]["image_base64"] = "x" * 20001  # not a whole number of base64 quads
    members = [
        ("invalid.json", b"{not json"),
        ("nokey.json", json.dumps({"text_list": ["a."], "image_info": [{}]}).encode()),
        ("badtypes.json", json.dumps({"text_list": [1, 2], "image_info": [], "similarity_matrix": []}).encode()),
        ("ragged.json", json.dumps({"text_list": ["a.", "b."], "image_info": [{}, {}], "similarity_matrix": [[0.3], [0.1, 0.2]]}).encode()),
        *mmc4_base64_members("shape", mmc4_doc(["a.", "b."], [photos["rocket"]], [[0.3, 0.1, 0.2]])),
        *mmc4_base64_members("small", mmc4_doc(["a.", "b."], [tiny], [[0.3, 0.1]])),
        *mmc4_base64_members("undecodable", mmc4_doc(["a.", "b."], [b"\x89PNG garbage" * 1000], [[0.3, 0.1]])),
        ("badb64.json", json.dumps(d).encode()),  # image 0 bad: image 1 alone survives (single image, kept)
        *mmc4_member_members("missing", mmc4_doc(["a.", "b."], [None], [[0.3, 0.1]])),
        ("onlyimage.000.jpg", photos["rocket"]),  # a document whose JSON member is absent
        *mmc4_base64_members("truncjpeg", mmc4_doc(["a.", "b."], [corrupt], [[0.3, 0.1]])),
        # documents listing no images: MMC4 writes an empty matrix (shape (0,), not (0, sentences)), or none at all
        ("noimages.json", json.dumps({"text_list": ["a.", "b."], "image_info": [], "similarity_matrix": []}).encode()),
        ("noimages2.json", json.dumps({"text_list": ["a."], "image_info": []}).encode()),
        *mmc4_base64_members("literal", mmc4_doc(["a <image> here.", "b."], [photos["rocket"]], [[0.1, 0.3]])),
        *mmc4_base64_members("good", good_doc),
    ]
    batches, drops = run_dataset(tmp_path, members, tokenizer, steps=2)
    assert [b["num_images"].item() for b in batches] == [1, 2]  # badb64's surviving image, then good
    assert drops == {
        "invalid_json": 1, "missing_key": 1, "bad_document": 1, "bad_similarity_matrix": 1,
        "bad_similarity_shape": 1, "image_too_small": 1, "no_usable_images": 3, "image_undecodable": 1,
        "image_bad_base64": 1, "image_missing": 1, "missing_json": 1, "bad_image": 1, "no_images": 2,
        "text_has_special_token": 1,
    }


def test_bad_laion_samples_and_a_truncated_tar_are_counted(tmp_path, tokenizer, photos):
    good = [m for i in range(3) for m in laion_members(f"ok{i}", photos["coffee"], f"a cup {i}")]
    bad = [
        *laion_members("noimg", None, "a caption"),
        *laion_members("nocap", photos["coffee"], None),
        *laion_members("empty", photos["coffee"], "   "),
        *laion_members("garbage", b"not an image at all", "a caption"),
        ("latin.txt", "caf\xe9".encode("latin-1")), ("latin.jpg", photos["coffee"]),
        *laion_members("token", photos["coffee"], "a <image> in the caption"),
        *laion_members("eoc", photos["coffee"], "ends a chunk <|endofchunk|> early"),
        *laion_members("eos", photos["coffee"], "the tokenizer's eos </s> inside"),
        *laion_members("pad", photos["coffee"], "<PAD>"),
    ]
    shard = write_tar(tmp_path / "whole.tar", bad + good)
    with tarfile.open(shard) as tar:
        last = [m for m in tar.getmembers() if m.name == "ok2.jpg"][0]
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(shard.read_bytes()[: last.offset_data + last.size // 2])  # cut inside ok2's image
    batches, drops = run_dataset(tmp_path, [], tokenizer, steps=2, kind="laion", batch_size=2, shards=str(truncated))
    assert len(batches) == 2  # ok0, ok1 from each of two passes over the shard
    assert drops == {"tar_corrupt": 1, "missing_image": 2, "missing_caption": 2, "empty_caption": 2, "bad_image": 2,
                     "bad_caption": 2, "text_has_special_token": 8}


def test_an_unopenable_command_shard_is_counted_and_named(tmp_path, tokenizer, photos, caplog):
    good = write_tar(tmp_path / "good.tar", laion_members("ok", photos["coffee"], "a cup"))
    from of_ds.data import build_train_data

    from .helpers import IMAGE_SPEC, RUNTIME, make_spec

    spec = make_spec(dict(name="d", kind="laion", shards=["pipe:cat /nonexistent/shard-0042.tar", str(good)],
                          batch_size=1, samples_per_epoch=2, shuffle_buffer=0, shuffle_initial=0))
    data = build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)
    with caplog.at_level("WARNING"):
        batches = list(data)
    assert len(batches) == 2  # the good sample twice: at least one read of the failing shard lies between
    assert set(data.drop_counts()["d"]) == {"shard_open_failed"}
    assert "pipe:cat /nonexistent/shard-0042.tar" in caplog.text


def test_a_loader_that_drops_everything_stops_naming_the_dataset_and_reasons(tmp_path, tokenizer, photos):
    low = mmc4_doc(["a.", "b."], [photos["rocket"]], [[0.1, 0.2]])
    with pytest.raises(DataStalledError, match=r"dataset 'd'.*no_images_above_threshold=20"):
        run_dataset(tmp_path, mmc4_base64_members("low", low), tokenizer, max_consecutive_drops=20)


def test_the_original_threshold_of_30_is_refused_by_the_spec():
    from of_ds.spec import SpecError

    from .helpers import make_spec

    with pytest.raises(SpecError, match="sim_threshold"):
        make_spec(dict(name="d", kind="mmc4", shards="x.tar", batch_size=1, sim_threshold=30))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_our_own_bugs_propagate_instead_of_being_counted(tmp_path, tokenizer, photos, workers):
    """A broken transform (size None) is a TypeError in our code: it must reach the caller, also from workers."""
    from of_ds.data import build_train_data

    from .helpers import IMAGE_SPEC, RUNTIME, make_spec

    shard = write_tar(tmp_path / "s.tar", laion_members("ok", photos["coffee"], "a cup"))
    spec = make_spec(dict(name="d", kind="laion", shards=str(shard), batch_size=1, samples_per_epoch=1, workers=workers))
    data = build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)
    data.plans[0].make_batcher.args[1].size = None  # a bug: the output size is gone
    with pytest.raises(TypeError):
        list(data)


def test_missing_shards_and_sizes_are_reported_by_field_and_file(tmp_path, tokenizer):
    from of_ds.data import build_train_data

    from .helpers import IMAGE_SPEC, RUNTIME, make_spec

    spec = make_spec(dict(name="laion", kind="laion", shards=str(tmp_path / "shard-{0..2}.tar"), batch_size=1,
                          samples_per_epoch=1))
    with pytest.raises(FileNotFoundError, match=r"data\.datasets\.laion\.shards: 3 shard\(s\) not found: .*shard-0\.tar"):
        build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)
    write_tar(tmp_path / "shard-0.tar", [])
    spec = make_spec(dict(name="laion", kind="laion", shards=str(tmp_path / "shard-0.tar"), batch_size=1))
    with pytest.raises(FileNotFoundError, match=r"samples_per_epoch.*sizes\.json"):
        build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)


def test_a_process_whose_loader_an_error_left_open_still_exits():
    """Loader workers ignore SIGTERM (the main process acts on a scheduler's signal), so multiprocessing's exit
    handler, which SIGTERMs daemonic children and then joins them, would wait forever for workers whose iterator an
    error left open; the loader's own exit handler kills them first."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch.utils.data import DataLoader, IterableDataset\n"
        "from of_ds.data.loader import ignore_stop_signals\n"
        "class Forever(IterableDataset):\n"
        "    def __iter__(self):\n"
        "        while True:\n"
        "            yield torch.zeros(1)\n"
        "left_open = iter(DataLoader(Forever(), batch_size=None, num_workers=2, worker_init_fn=ignore_stop_signals))\n"
        "next(left_open)\n"
        "print('exiting', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
