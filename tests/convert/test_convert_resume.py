"""Resume after a kill: the CLI with 2 workers is SIGKILLed once its first shard lands; a re-run completes the rest
and the shards equal a clean run's byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmc4_inputs import make_doc, photo_jpeg, write_zip

REPO = Path(__file__).resolve().parents[2]
N_ZIPS, DOCS, IMAGES = 4, 40, 4


def hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def cli(zips: Path, images: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "tools/convert_mmc4"), "--zip-files", str(zips / "docs_shard_{0..3}_v2.jsonl.zip"),
            "--image-dir", str(images), "--output-dir", str(out), "--workers", "2", "--resize-max-side", "96",
            "--no-progress"]


@pytest.mark.slow
def test_resume_after_kill_matches_a_clean_run(tmp_path):
    zips, images = tmp_path / "zips", tmp_path / "images"
    zips.mkdir()
    big = photo_jpeg("retina", side=1400, quality=95)  # resizing it costs a few ms: a shard takes about a second
    for s in range(N_ZIPS):
        (images / str(s)).mkdir(parents=True)
        for k in range(IMAGES):
            (images / str(s) / f"retina{k}.jpg").write_bytes(big)
        docs = [make_doc(3, [f"retina{k}.jpg" for k in range(IMAGES)], f"http://d/{s}/{i}") for i in range(DOCS)]
        write_zip(zips / f"docs_shard_{s}_v2.jsonl.zip", [json.dumps(d).encode() for d in docs])

    clean = tmp_path / "clean"
    subprocess.run(cli(zips, images, clean), check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(zips, images, out), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # a shard counts as done once its record follows its tar: wait for a record, not a tar (the kill could land between)
    while not any(out.glob(".convert/*.done.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = sorted(p.name for p in out.glob("*.tar"))
    assert 1 <= len(done_at_kill) < N_ZIPS, f"the kill should land mid-run; shards then: {done_at_kill}"
    assert not (out / "convert_report.json").exists()

    resumed = subprocess.run(cli(zips, images, out), check=True, capture_output=True, text=True)
    report = json.loads(resumed.stdout)
    assert report["shards_resumed"] >= 1 and report["shards_resumed"] + report["shards_converted"] == N_ZIPS
    assert hashes(out) == hashes(clean) and len(hashes(out)) == N_ZIPS
    assert not list((out / ".convert").glob("*.partial"))
    clean_report = json.loads((clean / "convert_report.json").read_text())
    run_keys = ("seconds", "images_per_second", "shard_cpu_seconds", "shards_converted", "shards_resumed")
    assert {k: v for k, v in report.items() if k not in run_keys} == {k: v for k, v in clean_report.items() if k not in run_keys}
    assert report["documents_written"] == N_ZIPS * DOCS and report["images_resized"] == N_ZIPS * DOCS * IMAGES
    assert (out / "sizes.json").read_bytes() == (clean / "sizes.json").read_bytes()
