"""Preflight: a path mistake in the spec fails `launch/train.py` at once, before any process group, model or run
directory: exit code 2, one line per problem naming the dotted field and the path, all problems together, no
traceback, nothing written. `--dry-run` runs the same checks. Each test runs `main(argv)` in-process, with and
without `--dry-run`, on the demo spec pointed at files made here."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from engines_launch import train_main

from of_ds.preflight import preflight_problems
from of_ds.spec import RunSpec

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "launch" / "specs" / "demo.yaml"
MODES = ["--dry-run", None]  # the dry run and the real run check the same


MAIN = train_main()


def write_tar(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("k0.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """Every path of the demo spec made here (shards, tokenizer, LM, vision weights); -> (root, --set overrides)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for kind in ("laion", "mmc4"):
        for i in range(2):
            write_tar(tmp_path / "data" / kind / f"{i:06d}.tar")
        write_tar(tmp_path / "data" / f"{kind}_val" / "000000.tar")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")
    (tmp_path / "vit.pt").write_bytes(b"weights")
    sets = [
        "run.demo_data=null",
        f"data.datasets.laion.shards={tmp_path}/data/laion/{{000000..000001}}.tar",
        f"data.datasets.mmc4.shards={tmp_path}/data/mmc4/{{000000..000001}}.tar",
        f"data.datasets.laion.val_shards={tmp_path}/data/laion_val/000000.tar",
        f"data.datasets.mmc4.val_shards={tmp_path}/data/mmc4_val/000000.tar",
        f"model.tokenizer={tmp_path}/tok",
        f"model.lm.name_or_path={tmp_path}/lm",
        f"model.lm.cache_dir={tmp_path}/hf-cache",
        f"model.vision.pretrained={tmp_path}/vit.pt",
        f"run.output_dir={tmp_path}/runs",
    ]
    return tmp_path, sets


def argv(sets: list[str], mode, *extra) -> list[str]:
    out = ["--spec", str(DEMO), "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")]
    for s in sets:
        out += ["--set", s]
    return out + ([mode] if mode else []) + list(extra)


def snapshot(root: Path) -> set:
    return {str(p) for p in root.rglob("*")}


def refused(root: Path, args: list[str], capsys) -> list[str]:
    """Run main; assert exit 2, no traceback, nothing written, no process group, quick. -> the problem lines."""
    before = snapshot(root)
    repo_before = {p.name for p in REPO.iterdir()}
    start = time.perf_counter()
    rc = MAIN(args)
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert not (dist.is_available() and dist.is_initialized()), "a process group was started"
    assert snapshot(root) == before, "something was written"
    assert {p.name for p in REPO.iterdir()} == repo_before
    assert took < 10, took
    return [line.strip()[2:] for line in err.splitlines() if line.startswith("  - ")]


def one_line(lines: list[str], field: str) -> str:
    named = [line for line in lines if line.startswith(field + ":")]
    assert len(named) == 1 and len(lines) == 1, lines
    return named[0]


def test_the_good_paths_pass(work):
    root, sets = work
    spec = RunSpec.from_yaml(DEMO, sets + [f"engine.deepspeed_config={REPO}/ds_configs/zero2.json"])
    assert preflight_problems(spec) == []
    assert not (root / "runs").exists()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("field, missing, count, first", [("data.datasets.mmc4.shards", "nope/{000000..000003}.tar", 4, "nope/000000.tar"),
                                                           ("data.datasets.laion.val_shards", "nope/val.tar", 1, "nope/val.tar")])
def test_missing_shards(work, mode, field, missing, count, first, capsys):
    root, sets = work
    line = one_line(refused(root, argv(sets + [f"{field}={root}/{missing}"], mode), capsys), field)
    assert f"{count} of {count} shard(s) not found" in line and f"{root}/{first}" in line


def test_held_out_shards_are_read_only_where_validation_is_on(work):
    root, sets = work
    assert preflight_problems(RunSpec.from_yaml(DEMO, sets + [f"data.datasets.laion.val_shards={root}/nope/val.tar",
                                                               "logging.eval_every_n_steps=0"])) == []


@pytest.mark.parametrize("mode", MODES)
def test_empty_shard_pattern(work, mode, capsys):
    root, sets = work
    line = one_line(refused(root, argv(sets + ["data.datasets.laion.shards="], mode), capsys), "data.datasets.laion.shards")
    assert "empty pattern" in line


@pytest.mark.parametrize("mode", MODES)
def test_a_shard_that_is_not_a_tar(work, mode, capsys):
    root, sets = work
    (root / "data" / "notes.tar").write_text("not a tar archive")
    line = one_line(refused(root, argv(sets + [f"data.datasets.laion.shards={root}/data/notes.tar"], mode), capsys),
                    "data.datasets.laion.shards")
    assert f"not a tar file: {root}/data/notes.tar" in line


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("field", ["model.tokenizer", "model.lm.name_or_path", "model.vision.pretrained"])
def test_a_model_path_that_is_not_there(work, mode, field, capsys):
    root, sets = work
    line = one_line(refused(root, argv(sets + [f"{field}=/nope/x"], mode), capsys), field)
    assert "not found" in line and "/nope/x" in line


@pytest.mark.parametrize("mode", MODES)
def test_a_typo_in_a_relative_local_path_is_not_taken_for_a_hub_name(work, mode, capsys, monkeypatch):
    """`assets/tokenzer` where `assets/` exists: a local path with a typo, reported as not found (not sent to the
    hub), even with model.offline off."""
    root, sets = work
    (root / "assets").mkdir()
    monkeypatch.chdir(root)
    line = one_line(refused(root, argv(sets + ["model.tokenizer=assets/tokenzer", "model.offline=false"], mode), capsys),
                    "model.tokenizer")
    assert line == "model.tokenizer: not found: assets/tokenzer"


@pytest.mark.parametrize("mode", MODES)
def test_hub_names_not_cached_when_offline(work, mode, capsys):
    root, sets = work
    line = one_line(refused(root, argv(sets + ["model.lm.name_or_path=someorg/not-cached-lm"], mode), capsys),
                    "model.lm.name_or_path")
    assert "'someorg/not-cached-lm' is not a local path and not in the HF cache" in line and "model.offline is set" in line


@pytest.mark.parametrize("mode", MODES)
def test_an_open_clip_tag_not_cached_when_offline(work, mode, capsys):
    import open_clip  # noqa: F401 - imported before the clock starts: its import is not what is timed

    root, sets = work
    vit = ["model.vision.name=ViT-B-32", "model.vision.pretrained=openai", "model.vision.config=null",
           f"model.vision.cache_dir={root}/clip-cache"]
    line = one_line(refused(root, argv(sets + vit, mode), capsys), "model.vision.pretrained")
    assert "ViT-B-32 'openai' weights are not in the cache, and model.offline is set" in line


@pytest.mark.parametrize("mode", MODES)
def test_an_output_dir_that_cannot_be_written(work, mode, capsys):
    root, sets = work
    (root / "afile").write_text("x")
    line = one_line(refused(root, argv(sets + [f"run.output_dir={root}/afile/runs"], mode), capsys), "run.output_dir")
    assert f"{root}/afile is a file, not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir(work, capsys):
    root, sets = work
    (root / "ro").mkdir(mode=0o555)
    line = one_line(refused(root, argv(sets + [f"run.output_dir={root}/ro/runs"], "--dry-run"), capsys), "run.output_dir")
    assert "is not writable" in line


@pytest.mark.parametrize("mode", MODES)
def test_a_resume_folder_without_a_checkpoint(work, mode, capsys):
    root, sets = work
    (root / "old-run").mkdir()
    line = one_line(refused(root, argv(sets + [f"checkpoint.resume_from={root}/old-run"], mode), capsys), "checkpoint.resume_from")
    assert "no complete checkpoint" in line and f"{root}/old-run" in line


@pytest.mark.parametrize("mode", MODES)
def test_a_resume_path_that_is_not_there(work, mode, capsys):
    root, sets = work
    line = one_line(refused(root, argv(sets + [f"checkpoint.resume_from={root}/nope.pt"], mode), capsys), "checkpoint.resume_from")
    assert f"not found: {root}/nope.pt" in line


def test_every_problem_at_once(work, capsys):
    root, sets = work
    (root / "afile").write_text("x")
    bad = [f"data.datasets.laion.shards={root}/nope.tar", "data.datasets.mmc4.shards=", "model.tokenizer=/nope/tok",
           "model.lm.name_or_path=/nope/lm", "model.vision.pretrained=/nope/vit.pt", f"run.output_dir={root}/afile/runs"]
    lines = refused(root, argv(sets + bad, None), capsys)
    fields = [line.split(":", 1)[0] for line in lines]
    assert fields == ["data.datasets.laion.shards", "data.datasets.mmc4.shards", "model.tokenizer",
                      "model.lm.name_or_path", "model.vision.pretrained", "run.output_dir"], lines


def test_remote_shards_are_accepted_and_a_pipe_needs_its_program(work, capsys):
    root, sets = work
    remote = ["data.datasets.laion.shards=s3://bucket/laion/{000000..000003}.tar",
              "data.datasets.mmc4.shards=pipe:cat /somewhere/else/000000.tar"]
    spec = RunSpec.from_yaml(DEMO, sets + remote)
    assert preflight_problems(spec) == []
    line = one_line(refused(root, argv(sets + ["data.datasets.mmc4.shards=pipe:no-such-program-of-ds x.tar"], "--dry-run"), capsys),
                    "data.datasets.mmc4.shards")
    assert "(no-such-program-of-ds) is not on PATH" in line


def test_the_demo_paths_are_not_refused_before_the_demo_data_is_made(tmp_path, monkeypatch):
    """run.demo_data: the demo spec's data, tokenizer, LM and vision weights are made on first use; once the demo
    data is complete (DONE and every part), its paths are checked like any other."""
    monkeypatch.chdir(tmp_path)
    spec = RunSpec.from_yaml(DEMO)  # demo_data/... relative to the working directory, none of it there
    assert preflight_problems(spec) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made by the check
    from of_ds.demo import EXPECTED

    demo = tmp_path / "demo_data"
    demo.mkdir()
    (demo / "DONE").write_text("")
    (demo / "vit.pt").write_bytes(b"")
    for part in set(EXPECTED) - {"DONE", "vit.pt", "laion_val"}:
        (demo / part).mkdir()
    assert preflight_problems(spec) == []  # a demo dir from before the held-out split: the run makes it anew
    (demo / "laion_val").mkdir()
    fields = {line.split(":", 1)[0] for line in preflight_problems(spec)}
    assert fields == {"data.datasets.laion.shards", "data.datasets.mmc4.shards", "data.datasets.laion.val_shards",
                      "data.datasets.mmc4.val_shards"}
