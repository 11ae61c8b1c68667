"""Shard lists (brace, glob, list, pipe:, s3://), sizes.json epochs, and reading shards through commands."""

import json

import pytest

from of_ds.data import build_train_data
from of_ds.data.loader import batches_of_worker, steps_for
from of_ds.data.shards import expand_shards

from .helpers import IMAGE_SPEC, RUNTIME, laion_members, make_spec, write_tar


@pytest.fixture
def shard_dir(tmp_path, photos):
    for s in range(3):
        write_tar(tmp_path / f"{s:06d}.tar", [m for i in range(4) for m in laion_members(f"s{s}-{i}", photos["coffee"], f"cup {s} {i}")])
    (tmp_path / "sizes.json").write_text(json.dumps({f"{s:06d}.tar": 4 for s in range(3)}))
    return tmp_path


def test_brace_glob_list_pipe_and_s3_expand(shard_dir):
    names = [str(shard_dir / f"{s:06d}.tar") for s in range(3)]
    assert expand_shards(str(shard_dir / "{000000..000002}.tar"), "f") == names
    assert expand_shards(str(shard_dir / "*.tar"), "f") == names
    assert expand_shards([names[2], str(shard_dir / "00000{0,1}.tar")], "f") == [names[2], names[0], names[1]]
    assert expand_shards("s3://bucket/x/{0..1}.tar", "f") == ["pipe:aws s3 cp s3://bucket/x/0.tar -",
                                                             "pipe:aws s3 cp s3://bucket/x/1.tar -"]
    assert expand_shards("pipe:curl -s http://h/{a,b}.tar", "f") == ["pipe:curl -s http://h/a.tar", "pipe:curl -s http://h/b.tar"]
    with pytest.raises(FileNotFoundError, match="f: 1 shard"):
        expand_shards(str(shard_dir / "nothing-*.tar"), "f")


@pytest.mark.slow
def test_sizes_json_gives_a_real_pass_and_pipe_shards_read_like_files(shard_dir, tokenizer):
    pattern = str(shard_dir / "{000000..000002}.tar")
    spec = make_spec(dict(name="d", kind="laion", shards=pattern, batch_size=2, workers=2))
    data = build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)
    assert data.steps_per_epoch == 6  # 12 samples / batch 2, a multiple of the 2 workers
    files = [b["d"]["input_ids"] for b in data]
    piped = make_spec(dict(name="d", kind="laion", shards=f"pipe:cat {pattern}", batch_size=2, workers=2,
                           samples_per_epoch=12))
    pipes = [b["d"]["input_ids"] for b in build_train_data(piped, tokenizer, IMAGE_SPEC, RUNTIME)]
    assert len(files) == len(pipes) == 6
    # the same samples (the urls differ, so the shard permutation may too): compare as sets of rows
    assert sorted(map(tuple, (r.tolist() for t in files for r in t))) == sorted(map(tuple, (r.tolist() for t in pipes for r in t)))


def test_epoch_arithmetic_matches_the_original():
    assert steps_for(125_000, 32, 8, 4) == 492  # the original's arithmetic: MMC4 32 x 125,000 on 8 GPUs, 4 workers
    assert steps_for(250_000, 64, 8, 4) == 492
    assert [batches_of_worker(w, 2, 1, 4) for w in (0, 1)] == [1, 2]  # steps 1, 2, 3 -> workers 1, 0, 1


def test_bench_data_prints_one_json_line_with_rate_and_drops(shard_dir, tiny_tokenizer_dir, capsys):
    from of_ds.data.bench import main

    main(["--kind", "laion", "--shards", str(shard_dir / "*.tar"), "--tokenizer", tiny_tokenizer_dir, "--vision",
          "ViT-B-32", "--batch-size", "2", "--workers", "0", "--batches", "2", "--shuffle-buffer", "4"])
    (line,) = capsys.readouterr().out.strip().splitlines()
    out = json.loads(line)
    assert out["samples"] == 4 and out["samples_per_s"] > 0 and out["seconds"] > 0 and out["drops"] == {}
