"""One owner per setting: every shipped spec dry-runs with every shipped ds_configs/*.json, the file deciding the ZeRO
stage and offload the spec leaves unset; a stage set explicitly (spec or --set) that disagrees with the file is
refused at preflight, naming both. The planner plans for --world-size N (each stage its own row) and prints its
recommendation as a command that dry-runs as printed. All in-process: `launch/train.py`'s `main(argv)`."""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from pathlib import Path

import pytest
import torch.distributed as dist
from engines_launch import train_main

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted(p.name for p in (REPO / "launch" / "specs").glob("*.yaml"))
CONFIGS = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
TINY_LM = ("model.lm.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
           "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}")


MAIN = train_main()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    for kind in ("laion", "mmc4"):
        (root / kind).mkdir()
        with tarfile.open(root / kind / "000000.tar", "w") as tf:
            info = tarfile.TarInfo("k0.txt")
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    return root


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def sets_for(spec_name: str, root: Path, tokenizer_dir: str) -> list[str]:
    """The shipped spec with its data (and, for the demo, its generated model files) pointed at files made here."""
    sets = [f"data.datasets.{k}.shards={root}/{k}/000000.tar" for k in ("laion", "mmc4")]
    sets += [f"run.output_dir={root}/runs", f"model.lm.cache_dir={root}/hf-cache"]  # an empty cache: nothing local
    if spec_name == "demo.yaml":
        sets += ["run.demo_data=null", f"model.tokenizer={tokenizer_dir}", "model.lm.name_or_path=null", TINY_LM,
                 "model.vision.pretrained=null"]
        sets += [f"data.datasets.{k}.val_shards={root}/{k}/000000.tar" for k in ("laion", "mmc4")]  # its held-out split
    return sets


def dry_run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = MAIN(argv)
    out = capsys.readouterr()
    assert not (dist.is_available() and dist.is_initialized())
    return rc, out.out, out.err


def with_sets(sets: list[str]) -> list[str]:
    return [w for s in sets for w in ("--set", s)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("spec_name", SPECS)
def test_every_shipped_spec_with_every_shipped_config(spec_name, config, shards, tiny_tokenizer_dir, capsys):
    argv = ["--spec", str(REPO / "launch" / "specs" / spec_name), "--deepspeed_config", str(REPO / "ds_configs" / config),
            "--dry-run", *with_sets(sets_for(spec_name, shards, tiny_tokenizer_dir))]
    rc, out, err = dry_run(argv, capsys)
    assert rc == 0, err
    want = json.loads((REPO / "ds_configs" / config).read_text())["zero_optimization"]
    stage = want["stage"]
    off_opt = want.get("offload_optimizer", {}).get("device", "none")
    off_param = want.get("offload_param", {}).get("device", "none")
    resolved = json.loads(out.split("# resolved DeepSpeed config\n", 1)[1].split("\n# parameters", 1)[0])
    assert resolved["zero_optimization"]["stage"] == stage
    assert f"[of_ds] DeepSpeed ZeRO-{stage}, offload optimizer: {off_opt}, parameters: {off_param}, precision " in out
    assert f"(from {REPO / 'ds_configs' / config} where it writes a value, else from the spec)" in out
    assert re.search(rf"^# memory per GPU.*\n.*\nZeRO-{stage}\b", out, flags=re.M), out[-800:]


def test_a_stage_set_explicitly_that_disagrees_with_the_file_is_refused_at_preflight(shards, tiny_tokenizer_dir, capsys):
    argv = ["--spec", str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), "--deepspeed_config",
            str(REPO / "ds_configs" / "zero3.json"), *with_sets(sets_for("openflamingo-3b.yaml", shards, tiny_tokenizer_dir)),
            "--set", "engine.zero_stage=2"]
    rc, out, err = dry_run(argv, capsys)  # a real run: refused before any process group
    assert rc == 2 and "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(lines) == 1 and "zero_optimization.stage is 3" in lines[0] and "engine.zero_stage is 2" in lines[0], err
    assert not (shards / "runs").exists()


def plan_totals(out: str) -> dict[str, float]:
    table = out.split("# all plans", 1)[1].split("\n# ", 1)[0]
    return {m[0]: float(m[1]) for m in re.findall(r"^(ZeRO-\d)\s+(?:[\d.]+\s+){5}([\d.]+)\s+[\d.]+$", table, flags=re.M)}


def test_the_plan_per_stage_differs_with_the_world_size(shards, tiny_tokenizer_dir, capsys):
    base = ["--spec", str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), "--dry-run", "--gpu-memory", "80GiB",
            *with_sets(sets_for("openflamingo-3b.yaml", shards, tiny_tokenizer_dir))]
    rc, one, err = dry_run(base, capsys)
    assert rc == 0, err
    totals = plan_totals(one)
    assert totals["ZeRO-1"] == totals["ZeRO-2"] == totals["ZeRO-3"] and "--world-size N plans for N GPUs" in one
    rc, eight, err = dry_run(base + ["--world-size", "8"], capsys)
    assert rc == 0, err
    totals = plan_totals(eight)
    assert list(totals) == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    assert totals["ZeRO-0"] > totals["ZeRO-1"] > totals["ZeRO-2"] > totals["ZeRO-3"], totals
    assert "# memory per GPU, 8 rank(s)" in eight and "--world-size N plans" not in eight


@pytest.mark.parametrize("spec_name,world,nodes,gpu,extra", [
    ("openflamingo-3b.yaml", 8, 1, "80GiB", []),
    ("openflamingo-9b.yaml", 1, 1, "80GiB", []),
    ("openflamingo-9b.yaml", 16, 2, "24GiB", []),
    ("openflamingo-3b.yaml", 8, 1, "80GiB", ["--set", "engine.zero_stage=3"]),  # the user's own stage, overruled
])
def test_the_recommendation_is_a_command_that_runs_as_printed(spec_name, world, nodes, gpu, extra, shards,
                                                              tiny_tokenizer_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the printed command's paths are the command line's, relative to here
    argv = ["--spec", f"launch/specs/{spec_name}", "--dry-run", "--gpu-memory", gpu, "--world-size", str(world),
            "--nodes", str(nodes), *with_sets(sets_for(spec_name, shards, tiny_tokenizer_dir)), *extra]
    rc, out, err = dry_run(argv, capsys)
    assert rc == 0, err
    rec = re.search(r"^# recommended for .*: (ZeRO-\d)( \+ optimizer offload \(cpu\))?( \+ parameter offload \(cpu\))?, "
                    r"(with|without) activation checkpointing", out, flags=re.M)
    assert rec, out[-1500:]
    words = shlex.split(re.search(r"^# run: (.*)$", out, flags=re.M).group(1))
    i = words.index("launch/train.py")
    launcher = words[:i]
    assert launcher[0] == "deepspeed" and launcher[launcher.index("--num_gpus") + 1] == str(world // nodes)
    assert ("--num_nodes" in launcher) == (nodes > 1) and (nodes == 1 or launcher[launcher.index("--num_nodes") + 1] == str(nodes))
    rc, again, err = dry_run(words[i + 1:] + ["--dry-run", "--world-size", str(world)], capsys)
    assert rc == 0, err
    stage = rec.group(1)[len("ZeRO-"):]
    opt = "cpu" if rec.group(2) else "none"
    param = "cpu" if rec.group(3) else "none"
    assert f"[of_ds] DeepSpeed ZeRO-{stage}, offload optimizer: {opt}, parameters: {param}," in again
    ckpt = "activation_checkpointing: true" in again
    assert ckpt == (rec.group(4) == "with")
