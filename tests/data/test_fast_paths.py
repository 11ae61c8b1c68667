"""The loader's fast paths agree with the slow, standard ones: tar reading vs tarfile, orjson vs json, batches
built in shared memory in DataLoader workers."""

import gzip
import io
import tarfile

import numpy as np
import pytest
import torch

from of_ds.data import build_train_data
from of_ds.data.drops import DropCounter
from of_ds.data.shards import iter_tar_samples, split_member_name, tar_members

from .helpers import IMAGE_SPEC, RUNTIME, laion_members, make_spec, mmc4_base64_members, mmc4_doc, run_dataset, write_tar


def _tarfile_reference(data: bytes) -> list[tuple]:
    """What the standard library's stream reader gives (the loader's former reader), or the error it raises."""
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for member in tar:
                parts = split_member_name(member.name) if member.isreg() else None
                out.append((parts, tar.extractfile(member).read() if parts is not None else None))
    except tarfile.ReadError:
        out.append("ReadError")
    return out


def _ours(data: bytes, seekable: bool) -> list[tuple]:
    class Pipe(io.BufferedReader):  # a stream that cannot seek, like a pipe: command's stdout
        def seekable(self):
            return False

    stream = io.BufferedReader(io.BytesIO(data)) if seekable else Pipe(io.BytesIO(data))
    out = []
    try:
        for parts, read in tar_members(stream):
            out.append((parts, read() if parts is not None else None))
    except tarfile.ReadError:
        out.append("ReadError")
    return out


def _tar(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


MEMBERS = [("d", None), ("a.jpg", b"x" * 700), ("a.txt", b"cap"), ("noext", b"1"), ("d/b.json", b"{}" * 300),
           ("d/b.000.jpg", b"y" * 1024), ("c.txt", b"")]


@pytest.mark.parametrize("seekable", [True, False])
def test_tar_members_read_like_tarfile_on_plain_special_compressed_and_broken_shards(seekable):
    plain = _tar(MEMBERS)
    long_name = "k" * 120 + ".jpg"
    cases = {
        "plain": plain,
        "gnu long names": _tar(MEMBERS + [(long_name, b"z" * 10), ("e.txt", b"e")], tarfile.GNU_FORMAT),
        "pax headers": _tar(MEMBERS + [("\u00e9t\u00e9.jpg", b"p"), (long_name, b"q")], tarfile.PAX_FORMAT),
        "gzip": gzip.compress(plain),
        "cut in a member's data": plain[:512 * 3 + 100],
        "cut in a header": plain[:512 * 4 + 200],
        "cut at a header": plain[:512 * 4],
        "garbage header after the first": plain[:512 * 4] + b"\x07" * 512 + plain[512 * 5:],
        "garbage first header": b"\x07" * 1024,
        "empty": b"",
        "only end-of-archive blocks": b"\x00" * 1024,
    }
    for name, data in cases.items():
        assert _ours(data, seekable) == _tarfile_reference(data), name


def test_a_shard_cut_inside_an_unwanted_member_ends_quietly_and_one_cut_inside_a_wanted_member_counts(tmp_path):
    data = _tar([("a.jpg", b"x" * 5000), ("a.json", b"j" * 5000)])
    for cut, wanted, corrupt in ((512 * 12 + 100, {"jpg"}, 0), (512 + 100, {"jpg"}, 1)):  # a.json, a.jpg
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        counter = DropCounter("d", 100)
        samples = list(iter_tar_samples(str(path), counter, wanted.__contains__))
        assert counter.counts.get("tar_corrupt", 0) == corrupt
        assert [s["jpg"] for s in samples] == ([b"x" * 5000] if not corrupt else [])


def test_json_that_orjson_refuses_is_judged_by_the_standard_library(tmp_path, tokenizer, photos):
    """NaN similarities are valid for Python's json (the document is then dropped as non-finite, not invalid)."""
    doc = mmc4_doc(["a.", "b."], [photos["rocket"]], [[0.3, 0.1]])
    members = mmc4_base64_members("nan", doc)
    members = [(members[0][0], members[0][1].replace(b"0.1]", b"NaN]"))]
    members += mmc4_base64_members("big", mmc4_doc(["a.", "b."], [photos["rocket"]], [[0.3, 0.1]]))
    members[-1] = (members[-1][0], members[-1][1].replace(b'"url"', b'"n": 123456789012345678901234567890, "url"'))
    batches, drops = run_dataset(tmp_path, members, tokenizer, steps=1)
    assert drops == {"bad_similarity_matrix": 1} and batches[0]["num_images"].tolist() == [1]


@pytest.mark.slow
def test_worker_batches_are_built_in_shared_memory_with_zero_padding(tmp_path, tokenizer, photos):
    docs = [mmc4_doc(["a.", "b.", "c."], [photos["rocket"], photos["coffee"]], [[0.3, 0.1, 0.1], [0.1, 0.1, 0.3]])]
    shard = write_tar(tmp_path / "s.tar", [m for i in range(8) for m in mmc4_base64_members(f"k{i}", docs[0])])
    laion = write_tar(tmp_path / "l.tar", [m for i in range(8) for m in laion_members(f"l{i}", photos["coffee"], f"a cup {i}")])
    common = dict(batch_size=2, samples_per_epoch=4, single_image_drop_prob=0.0, shuffle_buffer=0, shuffle_initial=0)
    out = {}
    for workers in (0, 1):
        spec = make_spec(dict(name="m", kind="mmc4", shards=str(shard), workers=workers, max_images=4, **common),
                         dict(name="l", kind="laion", shards=str(laion), workers=workers, **common))
        out[workers] = [b for b in build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)]
    for main, worker in zip(out[0], out[1]):
        assert worker["m"]["pixel_values"].is_shared()  # built in shared memory (LAION: moved there by the DataLoader)
        assert not main["m"]["pixel_values"].is_shared()
        for name in ("m", "l"):
            for key in main[name]:
                assert torch.equal(main[name][key], worker[name][key]), (name, key)
        assert worker["m"]["num_images"].tolist() == [2, 2]
        assert not worker["m"]["pixel_values"][:, 2:].any()  # padding slots are zero
        assert np.isfinite(worker["m"]["pixel_values"].numpy()).all()


def test_base64_decoding_equals_the_standard_librarys_lenient_decoder():
    import base64
    import binascii
    import os
    import random

    from of_ds.data.drops import DropSample
    from of_ds.data.interleaved import decode_base64

    rng = random.Random(0)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n !"
    cases = [base64.b64encode(os.urandom(n)).decode() for n in (0, 1, 2, 3, 1000, 30001)]
    cases += [c[:50] + "\n" + c[50:] for c in cases[-2:]] + ["AB==", "A===", "====", "AAAA====", "x" * 20001, "caf\u00e9"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 13))) for _ in range(3000)]
    for text in cases:
        try:
            expected = binascii.a2b_base64(text)
        except (binascii.Error, ValueError):
            with pytest.raises(DropSample, match="image_bad_base64"):
                decode_base64(text)
        else:
            assert decode_base64(text) == expected, text
